"""The project's modules import one another without a circle: the command-line scripts sit on top
and the modules they share below, so no module imports (directly or through others, at the top or
inside a function) a module that imports it."""
import ast
import os

from conftest import ROOT


def project_modules():
    """{module name: path} of the repository's top-level modules and the experiments package's."""
    modules = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    folder = os.path.join(ROOT, "experiments")
    modules.update({f"experiments.{name[:-3]}": os.path.join(folder, name) for name in os.listdir(folder)
                    if name.endswith(".py") and name != "__init__.py"})
    return modules


def imports(path, modules):
    """The project modules that the module at `path` imports anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from experiments import common
    return found & set(modules)


def find_cycle(graph):
    """A list of modules [a, b, ..., a] that import one another in a circle, or None."""
    state = {}  # module: "open" while its imports are being followed, "done" after

    def visit(module, path):
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state:
                cycle = visit(other, path + [other])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def test_find_cycle_sees_a_circle_through_other_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_a_module_that_imports_it():
    modules = project_modules()
    graph = {name: imports(path, modules) - {name} for name, path in modules.items()}
    assert {"suite", "probe", "autoattack_check"} <= graph["eval"]  # the graph is read (imports inside functions too)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
