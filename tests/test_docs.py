"""The README and docs/ point at things that exist: links, file paths, modules and configs.

Checked without running anything: every relative link (and its #anchor, for a Markdown target)
resolves; every repository path named in the text exists; every `python -m <module>` of this
repository has its file; every `--config=FILE[:ARG]` in a command builds through the config's
`get_config`, as `ml_collections.config_flags` calls it (with ARG when there is one), and every
`--config.<key>=` of that command names a key of the built config. The study READMEs'
relative links are checked too.
"""

from __future__ import annotations

import functools
import importlib
import pathlib
import re

import ml_collections
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
STUDY_READMES = sorted((ROOT / "experiments" / "results").glob("*/README.md"))
PACKAGES = ("remedis_jax", "data_pipelines", "experiments", "configs", "tests", "docs")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
# A repository path: starts with one of the packages or docs/, outside a longer path or URL.
REPO_PATH = re.compile(r"(?<![\w./:-])((?:%s)/[\w./*-]*)" % "|".join(PACKAGES))
MODULE = re.compile(r"python3? -m ((?:%s)(?:\.\w+)+)" % "|".join(PACKAGES[:4]))
CONFIG_FLAG = re.compile(r"--config=(\S+)")
CONFIG_FILE = re.compile(r"^(configs/[\w/]+\.py)(?::(\S+))?$")
OVERRIDE = re.compile(r"--config\.([\w.]+)=")


def _rel(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = heading.strip().lower().replace("`", "")
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def _anchors(path: pathlib.Path) -> frozenset[str]:
  text = FENCE.sub("", path.read_text())
  return frozenset(_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", text, re.M))


def _links(path: pathlib.Path) -> list[str]:
  return LINK.findall(FENCE.sub("", path.read_text()))


def _commands(text: str) -> list[str]:
  """Shell commands in fenced blocks (backslash continuations joined) and inline code."""
  commands = []
  for block in FENCE.findall(text):
    commands += [c.strip() for c in re.sub(r"\\\n\s*", " ", block).splitlines() if c.strip()]
  commands += INLINE_CODE.findall(FENCE.sub("", text))
  return commands


@pytest.mark.parametrize("doc", DOCS + STUDY_READMES, ids=_rel)
def test_relative_links_resolve(doc):
  missing = []
  for target in _links(doc):
    if re.match(r"^[a-z][\w+.-]*:", target):  # http:, https:, mailto:
      continue
    file_part, _, anchor = target.partition("#")
    resolved = (doc.parent / file_part).resolve() if file_part else doc
    if not resolved.exists():
      missing.append(f"{target} (no {resolved})")
    elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
      missing.append(f"{target} (no heading #{anchor} in {_rel(resolved)})")
  assert not missing, f"{_rel(doc)}: links that do not resolve: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_named_paths_and_modules_exist(doc):
  text = doc.read_text()
  missing = sorted({p for p in REPO_PATH.findall(text)
                    if not any(ROOT.glob(p.rstrip(".")))})  # a glob such as ops*.py: any match
  missing += sorted({m for m in MODULE.findall(text)
                     if not (ROOT / (m.replace(".", "/") + ".py")).exists()
                     and not (ROOT / m.replace(".", "/") / "__init__.py").exists()})
  assert not missing, f"{_rel(doc)} names paths or modules that do not exist: {missing}"


def _has_key(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


@functools.lru_cache(maxsize=None)
def _build(spec: str):
  """`--config=` as config_flags reads it: get_config(ARG) after a colon, else get_config()."""
  match = CONFIG_FILE.match(spec)
  assert match, f"--config={spec} is not configs/<file>.py[:ARG]"
  path, arg = match.groups()
  assert (ROOT / path).exists(), f"--config={spec}: no file {path}"
  module = importlib.import_module(path[:-3].replace("/", "."))
  return module.get_config(arg) if arg is not None else module.get_config()


def _config_uses(doc: pathlib.Path) -> list[tuple[str, list[str]]]:
  uses = []
  for command in _commands(doc.read_text()):
    specs = [s.strip("'\"`") for s in CONFIG_FLAG.findall(command)]
    for spec in specs:
      if spec != "...":  # a placeholder in prose ("--config=... --workdir=...")
        uses.append((spec, OVERRIDE.findall(command) if len(specs) == 1 else []))
  return uses


def test_docs_name_configs():
  """The check below must see the commands (a changed pattern would make it vacuous)."""
  assert len({spec for doc in DOCS for spec, _ in _config_uses(doc)}) >= 10


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_configs_in_commands_build(doc):
  problems = []
  for spec, keys in _config_uses(doc):
    try:
      config = _build(spec)
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f"--config={spec}: {type(e).__name__}: {e}")
      continue
    problems += [f"--config={spec}: no key {key!r} for --config.{key}="
                 for key in keys if not _has_key(config, key)]
  assert not problems, f"{_rel(doc)}:\n" + "\n".join(problems)
