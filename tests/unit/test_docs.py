"""The documentation: the site builds with every link checked, the generated reference pages are
current, the README stays short with its commands up front, and nothing tracked speaks of how the
code was developed (that history belongs in git and CHANGELOG.md)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GEN_DOCS = ROOT / "scripts" / "gen-docs"
README = ROOT / "README.md"


def run_gen_docs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GEN_DOCS), *args], capture_output=True, text=True, timeout=120)


# ---- the site ----------------------------------------------------------------------------------

def test_mkdocs_build_strict(tmp_path):
    """mkdocs.yml is strict: a broken link or anchor, or a page missing from the nav, fails it."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        if os.environ.get("CI"):
            pytest.fail("mkdocs is not installed, and CI installs it: pip install -e '.[docs]'")
        pytest.skip("mkdocs not installed (pip install -e '.[docs]')")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "aresjob" / "index.html").is_file()


def test_mkdocs_config_fails_on_broken_links():
    """The checks that make a broken link fail are in the config, not left to mkdocs' defaults."""
    text = (ROOT / "mkdocs.yml").read_text()
    config = yaml.safe_load(text)
    assert config["strict"] is True
    assert config["validation"]["links"]["anchors"] == "warn"
    assert config["validation"]["links"]["not_found"] == "warn"
    assert config["validation"]["nav"]["omitted_files"] == "warn"
    assert config["validation"]["nav"]["not_found"] == "warn"


# ---- the generated reference pages ---------------------------------------------------------------

def test_generated_reference_is_current():
    result = run_gen_docs("--check")
    assert result.returncode == 0, f"run .venv/bin/python scripts/gen-docs and commit the result\n{result.stderr}"


def test_check_fails_when_the_crd_changes(tmp_path):
    """A CRD that says something new makes the committed page out of date, and --check says so."""
    crd = yaml.safe_load((ROOT / "crds" / "aresjobs.ares.io.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    spec["model"]["description"] = "a description no page has yet"
    changed = tmp_path / "crd.yaml"
    changed.write_text(yaml.safe_dump(crd, sort_keys=False))

    result = run_gen_docs("--check", "--crd", str(changed))
    assert result.returncode == 1
    assert "aresjob.md is out of date" in result.stderr

    out = tmp_path / "out"
    assert run_gen_docs("--crd", str(changed), "--out", str(out)).returncode == 0
    assert "a description no page has yet" in (out / "aresjob.md").read_text()
    assert run_gen_docs("--check", "--crd", str(changed), "--out", str(out)).returncode == 0
    result = run_gen_docs("--check", "--out", str(out))  # the real CRD against the changed page
    assert result.returncode == 1 and "aresjob.md" in result.stderr


def test_check_fails_when_the_values_change(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text((ROOT / "charts" / "ares" / "values.yaml").read_text()
                      + "\n# -- A value no page has yet.\nnewValue: 3\n")
    schema = ROOT / "charts" / "ares" / "values.schema.json"
    result = run_gen_docs("--check", "--values", str(values), "--schema", str(schema))
    assert result.returncode == 1
    assert "values.md is out of date" in result.stderr
    out = tmp_path / "out"
    assert run_gen_docs("--values", str(values), "--schema", str(schema), "--out", str(out)).returncode == 0
    page = (out / "values.md").read_text()
    assert "## newValue" in page and "A value no page has yet." in page


def test_reference_covers_every_field():
    """Every property of the CRD's spec appears in the page, with its CEL messages."""
    crd = yaml.safe_load((ROOT / "crds" / "aresjobs.ares.io.yaml").read_text())
    page = (ROOT / "docs" / "reference" / "aresjob.md").read_text()

    def walk(schema: dict):
        for name, sub in schema.get("properties", {}).items():
            yield name, sub
            for inner in (sub, sub.get("items") or {}, sub.get("additionalProperties") or {}):
                if isinstance(inner, dict) and "properties" in inner:
                    yield from walk(inner)

    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for name, sub in walk(root["properties"]["spec"]):
        assert f"**`{name}`**" in page, name
        for rule in sub.get("x-kubernetes-validations", []):
            assert rule["rule"] in page


def test_every_test_marker_is_documented():
    """The markers pyproject.toml declares (not those plugins add) are in the testing guide."""
    block = re.search(r"^markers = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S).group(1)
    markers = re.findall(r'"([^"]+)"', block)
    assert markers
    page = (ROOT / "docs" / "development" / "testing.md").read_text()
    for marker in markers:
        name = marker.split(":")[0].strip()
        assert f"| `{name}` |" in page, f"marker {name} is not in docs/development/testing.md"


# ---- the README ------------------------------------------------------------------------------------

def test_readme_is_short_with_its_commands_up_front():
    lines = README.read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; move detail into docs/"
    head = "\n".join(lines[:120])
    for words in ("ares run", "helm install", "kubectl apply"):
        assert words in head, f"{words!r} is not in the README's first 120 lines"
    assert "REG/" not in README.read_text(), "a literal REG/... fails the chart's values schema when typed"


def test_readme_test_command_is_what_ci_installs():
    """The README's test command installs exactly what .ci/run installs."""
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r"\.venv/bin/pip install (.+)$", ci, re.M).group(1).strip()
    assert f"scripts/build-control-plane && python3 -m venv .venv && .venv/bin/pip install {install} && " \
           ".venv/bin/python -m pytest" in README.read_text()


def helm_set(values: dict, assignment: str) -> None:
    """Apply one `--set key.path=value` as helm does, for the forms the README uses."""
    key, _, raw = assignment.partition("=")
    value: object = raw
    if raw.startswith("{") and raw.endswith("}"):
        value = [item for item in raw[1:-1].split(",") if item]
    elif raw in ("true", "false"):
        value = raw == "true"
    *parents, last = key.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


@pytest.mark.parametrize("page", ["README.md", "docs/deploying/index.md"])
def test_helm_install_commands_pass_the_values_schema(page):
    """Typed as shown, a page's `helm install` is accepted by the chart's values schema."""
    jsonschema = pytest.importorskip("jsonschema")
    text = (ROOT / page).read_text()
    commands = re.findall(r"^helm install .*?(?<!\\)$", text, re.M | re.S)
    assert commands or page != "README.md"
    schema = yaml.safe_load((ROOT / "charts" / "ares" / "values.schema.json").read_text())
    for command in commands:
        values = yaml.safe_load((ROOT / "charts" / "ares" / "values.yaml").read_text())
        for assignment in re.findall(r"--set\s+'?([^'\s]+)'?", command):
            helm_set(values, assignment)
        jsonschema.validate(values, schema)
    if page == "README.md":
        assert "watchNamespaces={" in commands[0], "show a namespaced install"


def test_readme_examples_are_valid():
    """The job and run config in the README are accepted as they are."""
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)]
    job = next(b for b in blocks if b.get("kind") == "AresTrainingJob")
    run = next(b for b in blocks if b.get("kind") is None)
    validation = pytest.importorskip("ares_operator.validation")
    spec, problems = validation.validate(job["metadata"]["name"], job["spec"])
    assert spec is not None and problems == []
    from ares.roles.runconfig import RunConfig

    RunConfig.model_validate(run)


def test_no_two_test_modules_share_a_name():
    """pytest imports test modules by their file name (no packages): two of one name in different
    folders stop the whole run at collection."""
    names = [p.name for p in (ROOT / "tests").rglob("*.py") if p.name not in ("conftest.py", "__init__.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
