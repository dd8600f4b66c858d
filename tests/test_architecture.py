"""docs/architecture.md's table is the truth: each module imports only what it lists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def declared() -> dict[str, set[str]]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = {}
    for name, imports in re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|$", text, flags=re.M):
        table[name] = set(re.findall(r"`(\w+)`", imports))
    return table


def imported(module: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "backchat":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("backchat."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("backchat."))
    return found


def test_every_module_is_in_the_table_and_imports_only_what_it_lists():
    table = declared()
    modules = {path.stem: path for path in (ROOT / "backchat").glob("*.py") if path.stem != "__init__"}
    assert set(table) == set(modules), "docs/architecture.md lists every module, and only those"
    for name, path in modules.items():
        extra = imported(path) - table[name] - {name}
        assert not extra, f"backchat/{name}.py imports {sorted(extra)}, which docs/architecture.md does not allow"


def test_only_transport_touches_pyinfra_internals():
    internals = ("host.connector", "make_unix_command", "current_op_global_arguments", "get_transport")
    for path in (ROOT / "backchat").glob("*.py"):
        if path.stem == "transport":
            continue
        text = path.read_text()
        for needle in internals:
            assert needle not in text, f"{path.name} uses {needle}: only backchat/transport.py may"
