"""deploy/README.md: its commands name real files and profiles, and the real CLI accepts them."""

from __future__ import annotations

import re
import shlex

from tests.deploy._deploy import DEPLOY, FAKE_BOOTSTRAP, REPO, check_command, compose

README = DEPLOY / "README.md"


def shell_lines() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = []
    for block in blocks:
        for raw in block.splitlines():
            line = raw.split("  #")[0].strip()
            if line:
                lines.append(line)
    return lines


def test_lioncub_peer_commands_are_accepted() -> None:
    checked = 0
    for line in shell_lines():
        words = shlex.split(line.replace("MADDR", FAKE_BOOTSTRAP))
        if words[0] == "lioncub-peer":
            argv = words[1:]
        elif words[:2] == ["docker", "run"]:
            image = next(i for i, w in enumerate(words) if w in ("lioncub:cpu", "lioncub:cuda"))
            argv = words[image + 1 :]
        elif words[0] == "kubectl" and "--" in words:
            argv = words[words.index("--") + 2 :]
        else:
            continue
        check_command(argv)
        checked += 1
    assert checked >= 4


def test_referenced_files_and_profiles_exist() -> None:
    profiles: dict[str, set[str]] = {}
    for line in shell_lines():
        for path in re.findall(r"(?:docker|deploy)/[\w./-]+", line):
            if path.startswith("deploy/k8s/base/bootstrap"):
                continue  # made by make-bootstrap-identity.sh
            assert (REPO / path).exists(), f"deploy/README.md: {path} does not exist ({line})"
        m = re.search(r"docker compose -f (docker/\S+)", line)
        if m:
            doc = compose(REPO / m.group(1))
            profiles.setdefault(m.group(1), set()).update(
                p for s in doc["services"].values() for p in s.get("profiles", [])
            )
            used = re.search(r"--profile (\S+)", line)
            if used:
                assert used.group(1) in profiles[m.group(1)], line
            scaled = re.search(r"--scale (\w+)=", line)
            if scaled:
                assert scaled.group(1) in doc["services"], line
