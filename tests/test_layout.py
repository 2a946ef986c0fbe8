"""The house rules of minc_rl's layout (minc_rl/__init__.py): each room imports only the rooms below it, no module
takes part in an import circle, the command-line checks load without torch or SB3, and the light copies of names
those checks need agree with their sources."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# installed name -> folder (pyproject's package-dir): agents/, envs/ and configs/ install inside minc_rl
FOLDERS = {"minc_rl": REPO / "minc_rl", "minc_rl.agents": REPO / "agents", "minc_rl.envs": REPO / "envs",
           "minc_rl.configs": REPO / "configs"}
# what each room may import besides itself, as minc_rl/__init__.py's map says; "entry" is the thin entry points
# (minc_rl/train.py, ...) and the package itself, which may import any room
ALLOWED = {
    "common": set(),
    "configs": set(),
    "losses": {"common"},
    "envs": {"common"},
    "ssl": {"common", "configs", "losses", "envs"},
    "rl": {"common", "losses", "ssl"},
    "agents": {"common", "losses", "ssl", "rl"},
    "runs": {"common", "configs", "losses", "envs", "ssl", "rl", "agents"},
    "atariari": {"common", "configs", "losses", "envs", "ssl", "rl", "agents", "runs"},
}
ENTRY_POINTS = ("minc_rl.train", "minc_rl.pretrain", "minc_rl.linear_eval", "minc_rl.report", "minc_rl.probe")


def modules() -> dict[str, Path]:
    """Every module of the installed package by its dotted name (a package by its __init__.py)."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The minc_rl modules `name` imports anywhere in its file (module level or inside a function)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])])
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known.keys()
            targets |= submodules or {base}
    return {target for target in targets if target in known}


def room(name: str) -> str:
    """The room of a module: minc_rl.<room>[...]; the entry points and the package itself are 'entry'."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "entry"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def test_every_module_lives_in_a_room_or_is_an_entry_point(graph):
    strays = sorted(name for name in graph if room(name) == "entry" and name not in (*ENTRY_POINTS, "minc_rl"))
    assert strays == [], f"modules outside the rooms of minc_rl/__init__.py: {strays}"


def test_each_room_imports_only_the_rooms_below_it(graph):
    breaches = sorted(
        f"{name} imports {target}"
        for name, targets in graph.items() if room(name) != "entry"
        for target in targets if room(target) != room(name) and room(target) not in ALLOWED[room(name)]
    )
    assert breaches == []


def circles(graph: dict[str, set[str]]) -> list[str]:
    """Every import circle a depth-first walk of `graph` meets, as 'a -> b -> a'."""
    found, done, path = [], set(), []

    def visit(name: str) -> None:
        if name in path:
            found.append(" -> ".join([*path[path.index(name):], name]))
            return
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    return found


def test_no_module_is_part_of_an_import_circle(graph):
    assert circles(graph) == []


def test_the_rule_catches_a_breach_and_a_circle(tmp_path, monkeypatch):
    """The checks above are real: a room importing upwards, and two modules importing each other, are found."""
    (tmp_path / "minc_rl" / "common").mkdir(parents=True)
    (tmp_path / "minc_rl" / "losses").mkdir()
    (tmp_path / "minc_rl" / "common" / "a.py").write_text("from minc_rl.losses import b\n")
    (tmp_path / "minc_rl" / "losses" / "b.py").write_text("def f():\n    from minc_rl.common import a\n")
    monkeypatch.setattr(sys.modules[__name__], "FOLDERS", {"minc_rl": tmp_path / "minc_rl"})
    known = modules()
    found = {name: imported(name, path, known) for name, path in known.items()}
    assert found == {"minc_rl.common.a": {"minc_rl.losses.b"}, "minc_rl.losses.b": {"minc_rl.common.a"}}
    assert room("minc_rl.losses.b") not in ALLOWED[room("minc_rl.common.a")]
    assert circles(found) == ["minc_rl.common.a -> minc_rl.losses.b -> minc_rl.common.a"]


@pytest.mark.parametrize("module", ["minc_rl.train", "minc_rl.pretrain", "minc_rl.linear_eval", "minc_rl.probe",
                                    "minc_rl.rl.settings", "minc_rl.envs.spec"])
def test_the_command_line_checks_load_without_torch_or_sb3(module):
    """What a typo, a bad value, a bad group choice or --help needs is importable without torch, SB3 or gym."""
    code = (f"import sys, {module}; heavy = sorted({{'torch', 'stable_baselines3', 'gym', 'gymnasium'}} & "
            "set(sys.modules)); print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_the_light_copies_of_names_agree_with_their_sources():
    """minc_rl.rl.settings and minc_rl.runs.train_config name, without importing them, what torch-side modules define."""
    import minc_rl.configs
    from minc_rl.losses import AUX_LOSSES
    from minc_rl.losses import latent
    from minc_rl.rl.settings import AUX_CHOICES, ENCODER_CHOICES, LATENT_LOSSES, AuxConfig
    from minc_rl.runs import train_config, training
    from minc_rl.ssl.encoders import ENCODERS

    assert AUX_CHOICES == ("none", *AUX_LOSSES, "selfpred") == minc_rl.configs.AUX_GROUP_OPTIONS
    assert ENCODER_CHOICES == ("auto", *ENCODERS)
    assert LATENT_LOSSES == latent.LATENT_LOSSES
    assert train_config.AGENT_NAMES == tuple(training.AGENTS)
    assert train_config.TD_PAIR_AGENTS == tuple(n for n, agent in training.AGENTS.items() if agent.takes_td_settings)
    for name, agent in training.AGENTS.items():
        cfg = train_config.OmegaConf.create({"aux": {"name": "minc"}, "agent": {"name": name}})
        assert train_config.aux_config(cfg) == agent.aux_config(AuxConfig())
