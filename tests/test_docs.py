"""README.md and docs/*.md stay true to the repository: links, paths, commands and overrides.

Static checks only (nothing is run), so the whole file takes seconds:
- every relative markdown link `[text](path#anchor)` points at a file (and heading) that exists;
- every backticked repository path (`capture_jax/losses.py`, `docs/scaling.md`, `.ci/run`, a
  directory such as `tfds_product1m/`) and every path of the README's layout tree exists;
- every command runs a script or module that exists, with flags that script defines;
- every `--config.a.b=VALUE` override names a field of the config of the variant its command
  names (`configs/capture.py:VARIANT`; `demo` when none is named), and every named variant exists;
- the README holds CI's test command verbatim and the quickstart command, and nothing points at
  design notes that live outside the repository.
"""

import functools
import importlib.util
import itertools
import pathlib
import re
import shlex
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
DOC_IDS = [str(p.relative_to(ROOT)) for p in DOC_FILES]

# Top-level entries of the repository: a backticked path starting with one of these is ours.
REPO_DIRS = ("capture_jax", "configs", "bench", "docs", "tests", "tfds_product1m", ".ci")
FILE_SUFFIXES = (".py", ".md", ".txt", ".tsv", ".json", ".sh", ".bib", ".ini", ".jpg")
# Bare file names in backticks that are other projects' files, not ours.
EXTERNAL_FILES = {"generate_tsv.py", "evaluate_suit.py"}
# Design notes that exist beside the repository but not in it: nothing may point at them.
OUTSIDE_NOTES = ("CAPTURE_SPEC", "PRODUCT1M.md", "DESIGN.md", "JAX_NOTES.md")
ABSL_FLAGS = {"verbosity", "v", "logtostderr", "alsologtostderr", "log_dir", "flagfile",
              "help", "helpfull", "helpshort", "stderrthreshold", "only_check_args"}
DEFAULT_VARIANT = "demo"
QUICKSTART = ("pip install -r requirements.txt -e . && python main.py --config configs/capture.py:demo "
              "--workdir /tmp/capture_demo")

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
CODE_SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
VARIANT_REF = re.compile(r"configs/capture\.py:(\w+)")
OVERRIDE = re.compile(r"--config\.([\w.{},]+)=")


# ----------------------------------------------------------------------------------------------
# Reading the markdown


def _split(path: pathlib.Path) -> tuple[str, list[tuple[str, str]]]:
    """(prose with fenced blocks blanked out, [(language, block text)])."""
    text = path.read_text(encoding="utf-8")
    blocks = [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]
    return FENCE.sub("\n", text), blocks


def _code_spans(prose: str) -> list[str]:
    """Inline code spans, with line breaks inside a span turned into spaces."""
    return [" ".join(span.split()) for span in CODE_SPAN.findall(prose)]


def _commands_of_block(block: str) -> list[str]:
    """The command lines of a shell block: continuations joined, comments kept for shlex."""
    out, current = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            out.append(current.strip())
        current = ""
    return out


def _commands(path: pathlib.Path) -> list[str]:
    """Every command of a file: shell-block lines and code spans that start like a command."""
    prose, blocks = _split(path)
    commands = []
    for lang, block in blocks:
        if lang in ("", "sh", "bash", "shell", "console"):
            commands += _commands_of_block(block)
    starts = ("python ", "python3", "pip ", "tfds ", "time ", "JAX_")
    commands += [s for s in _code_spans(prose) if s.startswith(starts)]
    return commands


def _tokens(command: str) -> list[str]:
    """shlex tokens of one command line (comments dropped); optional `[...]` brackets removed."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:  # An unbalanced quote in prose: fall back to whitespace.
        tokens = command.split()
    return [t.strip("[]") for t in tokens if t.strip("[]") and t not in ("...", "...]")]


def _invocations(command: str) -> list[list[str]]:
    """Each `python ...` call in a command (split at &&, ; and |; quoted inner commands too)."""
    tokens = _tokens(command)
    calls, current = [], []
    for token in tokens + ["&&"]:
        if token in ("&&", ";", "||", "|"):
            if current:
                calls.append(current)
            current = []
        elif " " in token and "python" in token:  # e.g. ssh --command "cd x && python ..."
            calls += _invocations(token)
        else:
            current.append(token)
    out = []
    for call in calls:
        for i, token in enumerate(call):
            if re.fullmatch(r"python(3(\.\d+)?)?", token):
                out.append(call[i:])
                break
    return out


# ----------------------------------------------------------------------------------------------
# What the repository defines


@functools.cache
def _config_module():
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("capture_config_for_docs",
                                                  ROOT / "configs" / "capture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _config(variant: str):
    return _config_module().get_config(variant)


def _has_field(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        try:
            if part not in node:
                return False
            node = node[part]
        except TypeError:  # A leaf value reached before the path ended.
            return False
    return True


def _expand_braces(dotted: str) -> list[str]:
    """`model.{text,visual}.remat` -> [`model.text.remat`, `model.visual.remat`]."""
    parts = re.split(r"(\{[^}]*\})", dotted)
    options = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(choice) for choice in itertools.product(*options)]


def _source_of(invocation: list[str]) -> pathlib.Path | None:
    """The repository file a `python X.py` / `python -m pkg.mod` call runs; None if not ours."""
    if len(invocation) > 2 and invocation[1] == "-m":
        module = invocation[2]
        if module.split(".")[0] not in REPO_DIRS:
            return None  # pytest, venv, pip...
        base = ROOT.joinpath(*module.split("."))
        package_main = base / "__main__.py"
        return package_main if package_main.exists() else base.with_suffix(".py")
    if len(invocation) > 1 and invocation[1].endswith(".py"):
        return ROOT / invocation[1]
    return None


def _defines_flag(source: pathlib.Path, name: str) -> bool:
    """The flag appears as a quoted name in the script or in the shared CLI plumbing."""
    texts = [source.read_text(encoding="utf-8")]
    cli = ROOT / "capture_jax" / "cli.py"
    if cli.exists():
        texts.append(cli.read_text(encoding="utf-8"))
    pattern = re.compile(rf"""["'](--)?{re.escape(name)}["']""")
    return any(pattern.search(t) for t in texts)


# ----------------------------------------------------------------------------------------------
# Paths


def _github_slug(heading: str) -> str:
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    prose, _ = _split(path)
    return {_github_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", prose, re.M)}


def _repo_path(token: str) -> str | None:
    """The repository path a backticked token names, or None if it does not look like one."""
    token = token.strip("\"'(),;.").split(":")[0] if not token.startswith(".ci") else token
    token = token.strip("\"'(),;")
    if not token or any(c in token for c in "<>{}*$ ") or token.startswith(("/", "~")):
        return None
    first = token.split("/")[0]
    looks_like_file = token.endswith("/") or pathlib.PurePosixPath(token).suffix in FILE_SUFFIXES
    if "/" in token:
        if first in REPO_DIRS and (looks_like_file or first.startswith(".")):
            return token
        return None
    if token.endswith((".py", ".md")) and token not in EXTERNAL_FILES:
        return token  # A bare file name: must be at the root (or beside the markdown file).
    return None


def _tree_paths(block: str) -> list[str]:
    """Paths of a layout tree: indentation nests entries under the directories above them."""
    paths, stack = [], []  # stack of (indent, directory)
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        if not (name.endswith("/") or pathlib.PurePosixPath(name).suffix):
            continue  # A continued description.
        while stack and stack[-1][0] >= indent:
            stack.pop()
        full = "".join(d for _, d in stack) + name
        paths.append(full)
        if name.endswith("/"):
            stack.append((indent, name))
    return paths


def _path_tokens(path: pathlib.Path) -> list[str]:
    prose, blocks = _split(path)
    tokens = []
    for span in _code_spans(prose):
        tokens += span.replace("=", " ").split()
    for command in _commands(path):
        tokens += [t for tok in _tokens(command) for t in tok.replace("=", " ").split()]
    return tokens


# ----------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("doc", DOC_FILES, ids=DOC_IDS)
def test_links_exist(doc):
    prose, _ = _split(doc)
    broken = []
    for target in LINK.findall(CODE_SPAN.sub("", prose)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{doc.name}: broken links: {broken}"


@pytest.mark.parametrize("doc", DOC_FILES, ids=DOC_IDS)
def test_repository_paths_exist(doc):
    missing = set()
    for token in _path_tokens(doc):
        rel = _repo_path(token)
        if rel is None:
            continue
        candidates = [ROOT / rel]
        if "/" not in rel:
            candidates.append(doc.parent / rel)
        if not any(c.exists() for c in candidates):
            missing.add(rel)
    _, blocks = _split(doc)
    for lang, block in blocks:
        if lang == "text":  # The layout tree.
            missing.update(p for p in _tree_paths(block) if not (ROOT / p).exists())
    assert not missing, f"{doc.name}: paths that do not exist: {sorted(missing)}"


@pytest.mark.parametrize("doc", DOC_FILES, ids=DOC_IDS)
def test_commands_run_existing_code_with_defined_flags(doc):
    problems = []
    for command in _commands(doc):
        for call in _invocations(command):
            source = _source_of(call)
            if source is None:
                continue
            if not source.exists():
                problems.append(f"{' '.join(call[:3])}: {source.relative_to(ROOT)} does not exist")
                continue
            for token in call[2:]:
                if not token.startswith("--"):
                    continue
                name = token[2:].split("=")[0]
                if name.startswith("config.") or name in ABSL_FLAGS or not name:
                    continue
                if not _defines_flag(source, name):
                    problems.append(f"{source.relative_to(ROOT)} has no flag --{name}")
    assert not problems, f"{doc.name}: {sorted(set(problems))}"


@pytest.mark.parametrize("doc", DOC_FILES, ids=DOC_IDS)
def test_named_variants_exist(doc):
    text = doc.read_text(encoding="utf-8")
    names = {n for n in VARIANT_REF.findall(text) if n.islower()}  # VARIANT is a placeholder.
    unknown = []
    for name in sorted(names):
        try:
            _config(name)
        except ValueError:
            unknown.append(name)
    assert not unknown, f"{doc.name}: unknown variants {unknown}"


def _overrides(doc) -> list[tuple[str, str, str]]:
    """(variant, dotted field, where) for every --config.x.y= in a command or code span."""
    prose, _ = _split(doc)
    sources = _commands(doc) + [s for s in _code_spans(prose) if "--config." in s]
    out = []
    for text in dict.fromkeys(sources):  # Commands found both ways are checked once.
        named = [n for n in VARIANT_REF.findall(text) if n.islower()]
        variant = named[0] if named else DEFAULT_VARIANT
        for dotted in OVERRIDE.findall(text):
            if any(c.isupper() for c in dotted):
                continue  # A placeholder such as --config.FIELD=VALUE.
            for field in _expand_braces(dotted.rstrip(".")):
                out.append((variant, field, text[:80]))
    return out


@pytest.mark.parametrize("doc", DOC_FILES, ids=DOC_IDS)
def test_config_overrides_name_existing_fields(doc):
    bad = sorted({f"--config.{field}= ({variant})" for variant, field, _ in _overrides(doc)
                  if not _has_field(_config(variant), field)})
    assert not bad, f"{doc.name}: overrides of fields that do not exist: {bad}"


def test_readme_has_ci_test_command_and_quickstart():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    command = [line.strip() for line in ci if line.strip() and not line.startswith("#")][-1]
    assert command == "python -m pytest -q", command
    readme = README.read_text(encoding="utf-8")
    _, blocks = _split(README)
    lines = [line.strip() for _, block in blocks for line in block.splitlines()]
    assert any(line == command or line.endswith("&& " + command) for line in lines), (
        f"README.md must show CI's test command {command!r} in a code block")
    assert QUICKSTART in readme, "README.md lost the quickstart command"


def test_readme_is_a_short_guide():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 260


@pytest.mark.parametrize("doc", DOC_FILES, ids=DOC_IDS)
def test_docs_do_not_point_outside_the_repository(doc):
    text = doc.read_text(encoding="utf-8")
    found = [name for name in OUTSIDE_NOTES if name in text]
    assert not found, f"{doc.name} refers to {found}, which are not in this repository"


def test_code_does_not_point_outside_the_repository():
    """The code describes the reference by pointing at docs/reference.md, not at notes we lack."""
    offenders = []
    sources = sorted(ROOT.glob("*.py")) + sorted(
        p for top in REPO_DIRS if (ROOT / top).is_dir() for p in (ROOT / top).rglob("*.py"))
    for path in sources:
        if path == pathlib.Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{path.relative_to(ROOT)}: {n}" for n in OUTSIDE_NOTES if n in text]
    assert not offenders, f"point these at docs/reference.md instead: {offenders}"
