"""The package layout names the architecture, and imports point down only (docs/design.md, "Layout")."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "tf_rmvae")

# What each part of the package may import from tf_rmvae (its own part always). Pure modules are functions of
# tensors or plain values (the configuration among them: every default is written there once, and the layers and
# models read theirs from it, so it sits below them); `data` knows no model; a layer knows nothing of how it is
# trained; a model nothing of the run that trains it; export takes a model, not a run.
PURE = {"objectives", "mixing", "choices", "config", "files", "version"}
ALLOWED = {
    "pure": {"pure"},
    "data": {"data"},
    "layers": {"pure", "layers"},
    "models": {"pure", "layers", "models"},
    "export": {"pure", "layers", "models"},
    "run": {"pure", "layers", "models", "export", "data", "run"},
}


def part(module: str) -> str | None:
    """`tf_rmvae.models.recursion` -> "models"; the root package itself -> None."""
    names = module.split(".")[1:]
    if not names:
        return None
    if names[0] in PURE:
        return "pure"
    return names[0]


def modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                yield path, dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted


def imports(path: str) -> list[str]:
    """The tf_rmvae modules (or packages) `path` imports, anywhere in the file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "tf_rmvae"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tf_rmvae":
            found += [f"{node.module}.{a.name}" if node.module == "tf_rmvae" else node.module for a in node.names]
    return found


def test_every_module_lives_in_a_part_of_the_architecture():
    for _, module in modules():
        assert module == "tf_rmvae" or part(module) in ALLOWED, f"{module} is in no part of the layout"


def test_imports_point_down_only_and_nothing_imports_the_package_root():
    problems = []
    for path, module in modules():
        if module == "tf_rmvae":
            continue  # the root only re-exports (lazily, by name)
        mine = part(module)
        for imported in imports(path):
            theirs = part(imported)
            if theirs is None:
                problems.append(f"{module} imports the package root")
            elif theirs not in ALLOWED[mine]:
                problems.append(f"{module} ({mine}) imports {imported} ({theirs})")
    assert not problems, "\n".join(problems)


def test_the_layout_test_sees_a_wrong_import():
    # The check itself: a layer importing the run code, or a model importing the root, would be reported.
    assert "run" not in ALLOWED[part("tf_rmvae.layers.encoders")]
    assert part("tf_rmvae") is None and part("tf_rmvae.objectives") == "pure"
    assert imports(os.path.join(PACKAGE, "run", "factory.py"))  # it does import the layers and models
