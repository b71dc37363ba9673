"""The CLI contract: fast help, located config errors, hot reload, packaging, JSON status."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from crewguard.cli import main
from crewguard.crew.workers.config_reload import ConfigReloader
from crewguard.settings import PACKAGED_CONFIG_DIR, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_help_does_not_import_crewai() -> None:
    code = "import sys; from crewguard.cli import build_parser; build_parser().format_help(); print('crewai' in sys.modules, 'langfuse' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


def test_read_only_commands_do_not_import_crewai(tmp_path: Path) -> None:
    code = (
        "import sys; from crewguard.cli import main; "
        "main(['status', '--json']); print('crewai' in sys.modules, file=sys.stderr)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**_env(), "CREWGUARD_DATA_DIR": str(tmp_path)},
        check=True,
    )
    assert proc.stderr.strip().endswith("False")
    assert json.loads(proc.stdout)["emails"]["total"] == 0


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("CREWGUARD_")}


def _write_config(tmp_path: Path, text: str) -> Path:
    for name in ("agents.yaml", "tasks.yaml"):
        (tmp_path / name).write_text((PACKAGED_CONFIG_DIR / name).read_text())
    path = tmp_path / "crewguard.yaml"
    path.write_text(text)
    return path


def test_bad_config_names_file_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = (PACKAGED_CONFIG_DIR / "crewguard.yaml").read_text()
    bad = base.replace("  timeout_s: 20\n", "  timeout_s: soon\n")
    assert bad != base
    path = _write_config(tmp_path, bad)
    line = bad.splitlines().index("  timeout_s: soon") + 1
    assert main(["--config", str(path), "config", "check"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line}: llm.timeout_s:" in err


def test_config_check_reports_agents_yaml_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_config(tmp_path, (PACKAGED_CONFIG_DIR / "crewguard.yaml").read_text())
    agents = (tmp_path / "agents.yaml").read_text().replace("max_iter: 4", "max_iter: -1", 1)
    (tmp_path / "agents.yaml").write_text(agents)
    assert main(["--config", str(path), "config", "check"]) == 1
    assert "agents.yaml:" in capsys.readouterr().err


def test_packaged_config_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check"]) == 0


def test_config_edit_applies_and_invalid_edit_keeps_last_good(tmp_path: Path) -> None:
    text = (PACKAGED_CONFIG_DIR / "crewguard.yaml").read_text()
    path = _write_config(tmp_path, text)
    reloader = ConfigReloader(path, load_settings(path))
    assert reloader.current().budgets.max_llm_calls == 8
    path.write_text(text.replace("max_llm_calls: 8", "max_llm_calls: 5"))
    assert reloader.current().budgets.max_llm_calls == 5
    path.write_text(text.replace("max_llm_calls: 8", "max_llm_calls: [oops"))
    assert reloader.current().budgets.max_llm_calls == 5  # refused, last good keeps running
    assert reloader.last_error and "crewguard.yaml" in reloader.last_error


def test_every_package_folder_is_listed_in_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    mapping = project["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert found - listed == set(), "add these to [tool.setuptools] packages"
