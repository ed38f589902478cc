"""The README's compose quick start and runbook name only what exists: compose services and profiles,
`xrayq` commands, settings and compose variables, Celery's control commands, sections they link to.
(tests/e2e/test_first_start.py runs the quick start's own shell lines against real processes.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from typer.main import get_command

from services.cli.main import BOOTSTRAP_KEY_BANNER, app
from shared.core.queue import PREDICT_QUEUE

ROOT = Path(__file__).resolve().parents[3]
README = (ROOT / "README.md").read_text()
SECTIONS = ("## Running with docker compose", "## Runbook")
# The `xrayq` API client's own variables (--server, --api-key), not settings of a service.
CLIENT_VARIABLES = {"XRAYQ_SERVER", "XRAYQ_API_KEY"}
# Options of `docker compose` sub-commands that take a value.
_VALUED_OPTIONS = {"--index", "--profile", "--scale", "-d", "-v", "--volume", "-e", "--since", "--tail"}


def section(heading: str) -> str:
    start = README.index(heading)
    return README[start : README.index("\n## ", start + 1)]


def code(text: str) -> list[str]:
    """Shell commands: lines of ```bash blocks (continuations joined, comments cut) and inline code."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands += [line.split(" #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    commands += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [command for command in commands if command and not command.startswith("#")]


def documented_code() -> list[str]:
    return [command for heading in SECTIONS for command in code(section(heading))]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def cli_commands(command=None, prefix: str = "") -> set[str]:
    command = command or get_command(app)
    children = getattr(command, "commands", None) or {}
    found = {prefix.strip()} if prefix else set()
    for name, child in children.items():
        found |= cli_commands(child, f"{prefix} {name}")
    return found


def test_every_docker_compose_command_names_existing_services() -> None:
    services = compose()["services"]
    profiles = {profile for service in services.values() for profile in service.get("profiles", [])}
    checked = 0
    for command in documented_code():
        if not command.startswith("docker compose "):
            continue
        named: list[str] = []
        words = shlex.split(command.replace("…", "").replace("$(", " ").replace(")", " "))[2:]
        names: list[str] = []  # words that are neither options, their values nor sub-commands
        for previous, word in zip(["", *words], words, strict=False):
            if previous == "--profile":
                assert word in profiles, command
            elif previous == "--scale":
                named.append(word.split("=")[0])
            elif not word.startswith("-") and previous not in _VALUED_OPTIONS and "|" not in word:
                names.append(word)
        subcommand, *arguments = names
        assert subcommand in {"up", "logs", "ps", "stop", "exec", "run"}, command
        # exec and run: the service, then the command run in it; the others: services only.
        named += arguments[:1] if subcommand in {"exec", "run"} else arguments
        assert set(named) <= set(services), command
        checked += 1
    assert checked >= 8


def test_every_xrayq_command_exists() -> None:
    commands = cli_commands()
    named = set()
    for command in documented_code():
        for match in re.finditer(r"\bxrayq ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", command):
            first, second = match[1], match[2]
            named.add(f"{first} {second}" if f"{first} {second}" in commands else first)
    assert {"migrate", "healthcheck", "keys create", "keys revoke", "models rollback", "models promote"} <= named
    assert named <= commands, sorted(named - commands)


def test_every_variable_named_is_documented_in_env_example() -> None:
    text = "\n".join(section(heading) for heading in SECTIONS)
    documented = set(re.findall(r"^# ([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), flags=re.M))
    named = set(re.findall(r"\b((?:XRAYQ|POSTGRES)_[A-Z0-9_]*[A-Z0-9])\b", text)) - CLIENT_VARIABLES
    assert named and named <= documented, sorted(named - documented)


def test_the_key_line_and_the_drain_commands_match_the_code() -> None:
    quick_start = section(SECTIONS[0])
    assert f"sed -n 's/^{BOOTSTRAP_KEY_BANNER}: //p'" in quick_start
    drains = [command for command in documented_code() if "celery -A services.worker.app" in command]
    assert (ROOT / "services" / "worker" / "app.py").is_file() and len(drains) == 3
    assert any(f"control cancel_consumer {PREDICT_QUEUE} -d" in command for command in drains)
    assert any("control shutdown -d" in command for command in drains)


def test_links_lead_to_sections_that_exist() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", README, flags=re.M)
    }
    for heading in SECTIONS:
        for anchor in re.findall(r"\]\(#([^)]+)\)", section(heading)):
            assert anchor in headings, anchor
