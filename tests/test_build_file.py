"""The Bazel BUILD file mirrors the package: every module and test has a target, and internal imports are deps."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tf_rmvae", "trainers", "benchmarks", "tests")
RULES = ("py_library", "py_binary", "py_test")


def parse_build():
    """`{target name: {"rule", "srcs", "deps", "data"}}` from the BUILD file (Starlark is Python syntax)."""
    with open(os.path.join(REPO, "BUILD"), encoding="utf-8") as f:
        tree = ast.parse(f.read(), "BUILD")
    targets = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in RULES:
            fields = {"rule": node.func.id, "srcs": [], "deps": [], "data": []}
            for keyword in node.keywords:
                if keyword.arg == "name":
                    name = keyword.value.value
                elif keyword.arg in ("srcs", "deps", "data") and isinstance(keyword.value, ast.List):
                    fields[keyword.arg] = [e.value for e in keyword.value.elts if isinstance(e, ast.Constant)]
            assert name not in targets, f"duplicate target {name}"
            targets[name] = fields
    return targets


def python_files():
    for package in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(root, name), REPO)


def internal_imports(path):
    """Repository files a module imports (top-level or inside functions)."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = set()

    def resolve(dotted):
        base = os.path.join(REPO, *dotted.split("."))
        for candidate in (base + ".py", os.path.join(base, "__init__.py")):
            if os.path.exists(candidate):
                return os.path.relpath(candidate, REPO)
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for dotted in names:
            if dotted.split(".")[0] in PACKAGES:
                target = resolve(dotted)
                if target and target != path:
                    found.add(target)
    return found


@pytest.fixture(scope="module")
def targets():
    return parse_build()


def test_every_module_and_test_file_has_exactly_one_target(targets):
    owners = {}
    for name, target in targets.items():
        for src in target["srcs"]:
            owners.setdefault(src, []).append(name)
    missing = [path for path in python_files() if path not in owners]
    assert not missing, f"files without a BUILD target: {missing}"
    doubled = {src: names for src, names in owners.items() if len(names) > 1}
    assert not doubled, f"files in several targets: {doubled}"


def test_every_listed_file_exists(targets):
    for name, target in targets.items():
        for src in target["srcs"] + target["data"]:
            if "*" not in src:
                assert os.path.exists(os.path.join(REPO, src)), f"{name} lists missing {src}"


def test_every_test_file_is_a_py_test_and_programs_are_binaries(targets):
    for target in targets.values():
        for src in target["srcs"]:
            if os.path.basename(src).startswith("test_"):
                assert target["rule"] == "py_test", f"{src} is in a {target['rule']}"
    binaries = {src for t in targets.values() if t["rule"] == "py_binary" for src in t["srcs"]}
    assert {"trainers/train.py", "trainers/benchmark.py"} <= binaries


def test_internal_imports_are_declared_deps(targets):
    owner = {src: name for name, t in targets.items() for src in t["srcs"]}
    problems = []
    for path in python_files():
        for imported in internal_imports(path):
            need, have = owner.get(imported), owner.get(path)
            if need and have and need != have and f":{need}" not in targets[have]["deps"]:
                problems.append(f"{have} ({path}) imports {imported} but lacks dep :{need}")
    assert not problems, "\n".join(problems)


def test_declared_deps_exist(targets):
    for name, target in targets.items():
        for dep in target["deps"]:
            if dep.startswith(":"):
                assert dep[1:] in targets, f"{name} depends on unknown {dep}"
