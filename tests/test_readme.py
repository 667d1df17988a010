"""The README, run: every command it shows a newcomer must work as written.

Marker convention: a line `<!-- docs-test -->` directly before a fenced ```bash or ```python block marks
that block as tested. The marked blocks run in README order in one scratch directory that holds what they
need: copies of `examples/` and `configs/`, and `my_photos/`, a tiny captioned data set of coloured shapes
(conftest's `make_tiny_dataset`) standing in for the reader's own photos. Bash blocks run with
`bash -euo pipefail` and the virtualenv's bin first on PATH (so `captioner` is the installed console
script), python blocks with the virtualenv's python. A block may use what an earlier one made (train, then
evaluate, then caption with the trained model). Each must exit 0, and where the README shows output,
CHECKS holds its important part. An unmarked command block must name why it cannot run here (UNTESTED).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import make_tiny_dataset

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MARKER = "<!-- docs-test -->"
BIN = Path(sys.executable).parent  # the virtualenv's bin: its python and the `captioner` script
TIMEOUT = 300  # seconds per block; each takes a few

# What an unmarked command block must mention: the reason it is not run by this test.
UNTESTED = {
    "make ": "the Makefile's targets (CI's .ci/run runs `make test`, which installs and runs this suite)",
    "../shared": "a full data set",
    "configs/flickr8k_": "a full Flickr8k training run",
}


@dataclass(frozen=True)
class Block:
    line: int  # line of the opening fence in README.md
    lang: str
    code: str
    marked: bool

    @property
    def name(self) -> str:
        """The first command of the block, for test ids and messages."""
        first = next(
            (s for s in map(str.strip, self.code.splitlines()) if s and not s.startswith("#")), self.lang
        )
        return re.sub(r"[^\w./-]+", "-", first.split("#")[0].strip())[:48].strip("-")


def parse_blocks(text: str) -> list[Block]:
    """Every fenced code block of a Markdown text, with whether a marker line sits right before it."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"(\s*)```(\w*)\s*", lines[i])
        if not fence:
            i += 1
            continue
        indent, lang = fence.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"README.md:{i + 1}: code block never closed")
        body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
        marked = i > 0 and lines[i - 1].strip() == MARKER
        blocks.append(Block(i + 1, lang, "\n".join(body) + "\n", marked))
        i = end + 1
    return blocks


BLOCKS = parse_blocks(README.read_text(encoding="utf-8"))
MARKED = [block for block in BLOCKS if block.marked]
RESULTS: dict[int, str] = {}  # stdout of the marked blocks run so far, by index


def shown_output(block: Block) -> Block | None:
    """The ```text block right after a marked block (blank lines between): what the README says it prints."""
    after = BLOCKS[BLOCKS.index(block) + 1] if BLOCKS.index(block) + 1 < len(BLOCKS) else None
    end = block.line + block.code.count("\n") + 1  # the closing fence
    lines = README.read_text(encoding="utf-8").splitlines()
    if after is None or after.lang != "text" or any(line.strip() for line in lines[end : after.line - 1]):
        return None
    return after


def output_pattern(line: str) -> re.Pattern:
    """A line of shown output as a pattern: "..." stands for anything, any number for any number (scores
    move with float rounding), and whitespace for whitespace; the words must be the program's."""
    parts = re.split(r"(\.\.\.|-?\d+(?:\.\d+)?|\s+)", line.strip())
    wild = {"...": ".*"}
    return re.compile(
        "".join(
            wild.get(part)
            or (r"-?\d+(?:\.\d+)?" if re.fullmatch(r"-?\d+(?:\.\d+)?", part) else None)
            or (r"\s+" if part.isspace() else re.escape(part))
            for part in parts
            if part
        )
    )


# ---------------------------------------------------------------------------------------------------
# Checks of what the blocks print or write, keyed by a command that appears in exactly one marked block


def check_caption(out: str, cwd: Path) -> None:
    assert re.search(r"^examples/photographer\.jpg\t\S", out, re.M), "no `path<TAB>caption` line"
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(records) == len(list((cwd / "examples").glob("*.jpg")))
    for record in records:
        assert record["caption"] and len(record["captions"]) == 3, record
        assert all(set(label) == {"label", "p"} for label in record["labels"]), record
    assert any(r["labels"] for r in records)


def check_python(out: str, cwd: Path) -> None:
    lines = out.splitlines()
    assert len(lines) == 8 and lines[0].strip() and lines[5].strip(), out
    for line in lines[1:4]:
        assert re.fullmatch(r" *-?\d+\.\d{3}  \S.*", line), line
    assert lines[4].startswith("[Label(label='tripod'"), lines[4]  # the encoder sees the tripod
    assert lines[6].strip() and lines[7].startswith("[Caption(") and lines[7].count("Caption(") == 2
    assert {"config.json", "model.safetensors", "vocab.json"} <= {
        p.name for p in (cwd / "my-model").iterdir()
    }


def check_serve(out: str, cwd: Path) -> None:
    assert '"status":"ok"' in out  # /healthz
    answer = json.loads((cwd / "caption.json").read_text())
    assert answer["caption"] and len(answer["captions"]) == 3
    assert answer["attention"]["words"] == answer["words"]  # the bundled model attends


def check_layout(fmt: str) -> Callable[[str, Path], None]:
    def check(out: str, cwd: Path) -> None:
        assert re.search(rf"^format\s+{re.escape(fmt)}$", out, re.M), out
        assert re.search(r"^images\s+3$", out, re.M) and re.search(r"^missing\s+0$", out, re.M), out

    return check


def check_own_photos(out: str, cwd: Path) -> None:
    for line in ("format +csv", "split source +split column", "images +24", "  train +8", "  test +8"):
        assert re.search(f"^{line}$", out, re.M), f"data inspect: no line {line!r}"
    assert "epoch 3: validation" in out
    assert (cwd / "runs/my-photos/best/config.json").is_file()
    captions = re.findall(r"^my_photos/images/\w+\.jpg\t(.*)$", out, re.M)
    assert len(captions) == 24 and all(captions), out


def check_evaluate(out: str, cwd: Path) -> None:
    for metric in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"):
        assert re.search(rf"^{metric}\s", out, re.M), f"no {metric} line"
    assert "8 images" in out and "eval-my-photos-best-test.json" in out
    report = json.loads((cwd / "eval-my-photos-best-test.json").read_text())
    assert report["images"] == 8 and len(report["captions"]) == 8


def check_search(out: str, cwd: Path) -> None:
    assert "6 photos searchable" in out, out
    hits = re.findall(r"^(\d)\t\d\.\d{4}\t(\S+\.jpg)\t\S.*$", out, re.M)
    assert [rank for rank, _ in hits] == ["1", "2", "3"], out
    assert all(Path(path).parent == cwd / "examples" for _, path in hits)


def check_export(out: str, cwd: Path) -> None:
    assert {"config.json", "vocab.json"} <= {p.name for p in (cwd / "exported").iterdir()}
    assert list((cwd / "exported").glob("*.onnx"))
    onnx = re.search(r"^examples/photographer\.jpg\t(.+)$", out, re.M)
    assert onnx, out
    first = next(
        i for i, block in enumerate(MARKED) if "captioner caption examples/photographer.jpg" in block.code
    )
    torch = re.search(r"^examples/photographer\.jpg\t(.+)$", RESULTS.get(first, ""), re.M)
    if torch:  # the README says both runtimes give the same captions
        assert onnx.group(1) == torch.group(1)


LAYOUTS = ("flickr8k", "flickr8k-kaggle", "flickr30k", "coco", "karpathy", "csv", "jsonl")
CHECKS: dict[str, Callable[[str, Path], None]] = {
    "captioner caption examples/ --format jsonl --n-best 3": check_caption,
    "Captioner.from_pretrained()": check_python,
    "captioner serve &": check_serve,
    **{f"captioner data inspect toy/{fmt}\n": check_layout(fmt) for fmt in LAYOUTS},
    "captioner train --config configs/my_photos.yaml": check_own_photos,
    "captioner evaluate my_photos": check_evaluate,
    "captioner search": check_search,
    "captioner export": check_export,
}


# ---------------------------------------------------------------------------------------------------
# The README's shape


def test_markers_sit_right_before_a_bash_or_python_block():
    lines = README.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if line.strip() == MARKER:
            following = lines[number].strip() if number < len(lines) else ""
            assert following in ("```bash", "```python"), f"README.md:{number}: {MARKER} not before a block"
    assert len(MARKED) >= 10


def test_every_unmarked_command_block_says_why_it_is_not_run():
    for block in BLOCKS:
        if block.lang in ("bash", "sh", "shell", "python") and not block.marked:
            assert any(reason in block.code for reason in UNTESTED), (
                f"README.md:{block.line}: a command block without {MARKER}; mark it, or make it one of "
                f"the untested kinds: {', '.join(UNTESTED.values())}"
            )


def test_every_check_matches_one_marked_block():
    for command in CHECKS:
        found = [block.line for block in MARKED if command in block.code]
        assert len(found) == 1, f"{command!r} is in marked blocks at README.md lines {found}, not in one"


# ---------------------------------------------------------------------------------------------------
# Running the marked blocks


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A scratch directory like a checkout: examples/, configs/, and the reader's own photos."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "examples", root / "examples")
    shutil.copytree(REPO / "configs", root / "configs")
    make_tiny_dataset(root / "my_photos", per_class=3)
    return root


def run(block: Block, cwd: Path) -> subprocess.CompletedProcess:
    if block.lang == "python":
        argv = [str(BIN / "python"), "-c", block.code]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", block.code]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Its own process group, so that whatever the block leaves running (a server) can be stopped.
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"README.md:{block.line}: still running after {TIMEOUT} s\n{block.code}\n{err[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


@pytest.mark.parametrize(
    "index", range(len(MARKED)), ids=[f"{i:02d}-{block.name}" for i, block in enumerate(MARKED)]
)
def test_readme_block(index, workspace):
    block = MARKED[index]
    assert (BIN / "captioner").exists(), f"{BIN} has no `captioner` script: `make install`"
    for host, port in re.findall(r"(127\.0\.0\.1):(\d+)", block.code)[:1]:
        if "captioner serve" in block.code and port_in_use(host, int(port)):
            pytest.fail(f"README.md:{block.line} serves on {host}:{port}, which another program is using")
    result = run(block, workspace)
    RESULTS[index] = result.stdout
    status = result.returncode
    assert status == 0, (
        f"README.md:{block.line}: exit status {status}\n{block.code}\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
    for command, check in CHECKS.items():
        if command in block.code:
            check(result.stdout, workspace)
    shown = shown_output(block)
    for line in shown.code.splitlines() if shown is not None else []:
        if line.strip() in ("", "...") or line.startswith("$ "):  # a gap, or the command that printed it
            continue
        assert output_pattern(line).search(result.stdout), (
            f"README.md:{shown.line}: the output shown there has a line the command no longer prints:\n"
            f"{line}\n--- it printed\n{result.stdout[-3000:]}"
        )
