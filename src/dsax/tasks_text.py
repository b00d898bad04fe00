"""Text sources for the synthetic tasks (``dsax.tasks``); no downloads.

- ``NOISE``: the Landmark-Attention passkey filler, five sentences repeated.
- ``natural_units()``: prose paragraphs from the CPython standard library found via
  ``sysconfig.get_paths()["stdlib"]``: triple-quoted strings (mostly docstrings)
  and ``#`` comment blocks of the top-level modules and a fixed list of packages
  (test folders, site-packages and dist-packages excluded), plus the language
  reference text in ``pydoc_data/topics.py``. A paragraph is kept when it reads
  as prose: one indentation level, 60+ characters, starts upper-case, ends with
  ".", ASCII, and has no code marks (``>>> :: = _ { } [ ] < > * ` | # @``), no URL
  and no run of 4+ digits (so task values never collide with it). Files are read
  in sorted order, duplicates dropped: the text is fixed for a given Python build
  (CPython 3.11: ~4.4K paragraphs, ~600K characters, ~1 s to load, cached).
- ``keys`` (RULER style "adjective-noun", e.g. "brave-lantern"), ``vocabulary``
  (real English words from the lists below first, then pronounceable CVCVC
  pseudo-words such as "bakor" once those run out), ``pseudo_word``.

Filler is handled as *units*: strings that each start with their separator (" "
or "\\n"), so any prefix of a unit stream joins into text, and unit boundaries are
the places where a needle may go (sentences for noise, words for natural text).
"""

from __future__ import annotations

import ast
import functools
import itertools
import pathlib
import re
import sysconfig
import textwrap

import numpy as np

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.",
         "Here we go.", "There and back again.")

ADJECTIVES = tuple("""
able active actual afraid agile alert alive ancient angry anxious aware awful
basic bitter blank blind bold bored brave brief bright broad broken busy calm
careful cheap chief civil clean clear clever cloudy coastal cold common complex
cool cosmic crazy crisp cruel curious daily damp dark dear decent deep dense
direct dirty distant divine dizzy double dry dull dusty eager early eastern easy
elegant empty endless equal exact extra faint fair false famous fancy fast fatal
fierce final fine firm flat fluffy fond foreign formal fragile frank free fresh
friendly frozen funny gentle giant glad global golden grand grateful great
greedy happy hard harsh heavy hidden hollow honest huge humble hungry icy ideal
idle jolly keen kind large late lazy legal little lively local lonely long loose
loud lovely loyal lucky major mellow mental merry mild minor modern modest moral
muddy narrow nasty native neat nervous noble noisy normal odd old open pale
patient plain pleasant polite poor popular precise pretty proud public pure
purple quick quiet rapid rare raw ready real red regular rich rigid ripe rough
round royal rude rural rusty sacred sad safe salty scarlet secret serious
shallow sharp shiny short shy silent silly simple sincere slim slow small smart
smooth soft solid sour spare spicy steady steep sticky stiff strange strict
strong sturdy subtle sudden sunny super sweet swift tall tame tender tense thick
thin tidy tight tiny tired total tough tragic tricky true typical ugly unique
upper urban useful vague valid vast violet visible vital vivid warm weak weary
wet white whole wicked wide wild wise witty wooden worthy young zealous
""".split())

NOUNS = tuple("""
acorn almond anchor antler apple apron arrow attic autumn avocado badge bakery
balloon bamboo banana banner barn barrel basket beach beacon beard beetle bell
bicycle biscuit blanket blossom bonnet bottle boulder bracelet bramble bread
breeze brick bridge brochure broom bucket buffalo butter button cabin cable
cactus camera candle canoe canvas canyon caravan carpet carrot castle cathedral
cattle cedar cellar chair chalk chapel cheetah cherry chestnut chimney cinnamon
circle citadel cliff clock cloud clover cobra coconut coffee comet compass
cookie copper coral cottage cotton coyote cradle crane crayon cricket crown
crystal cucumber cup curtain cushion dagger daisy desert diamond dinner dolphin
donkey dragon drawer drum dune eagle ember emerald engine fabric falcon feather
fence ferry fiddle field fig finger fjord flag flower flute fog forest fossil
fountain galaxy garden garlic garnet gate gazelle ginger giraffe glacier glove
goat goblet gondola granite grape guitar hammer hamster harbor harp harvest
hazel hedge helmet heron hill hive honey horizon horse iceberg igloo island
ivory jacket jaguar jasmine jewel jungle kayak kettle kitchen kite kiwi koala
ladder lagoon lake lantern lavender leaf lemon leopard library lighthouse lily
lion lizard llama lobster locket lotus magnet mammoth mango mantle maple marble
meadow meteor mirror mitten monkey moose moth mountain muffin museum mushroom
nectar needle nest notebook nutmeg oak oasis ocean olive orchard otter owl
oyster paddle pagoda palace pancake panther parrot parsley peach peacock pearl
pebble pelican pencil penguin pepper piano pillow pine pistachio planet plum
pocket pond potato prairie pumpkin puzzle quartz quilt rabbit raccoon radio
raisin raven reef rhino ribbon river rocket saddle saffron sailor salmon sandal
sapphire satellite saucer scarf scroll seashell sequoia shadow shell sherbet
shovel silver skate sparrow spider sponge spoon spruce squirrel stallion
starfish statue stone storm stove sunflower sunset swan sweater table
tambourine teapot temple tent thistle thunder ticket tiger timber tomato topaz
tower tractor train treasure trumpet tulip tunnel turnip turtle umbrella valley
vanilla vase velvet village violin volcano wagon wallet walnut walrus whale
whistle willow window winter wizard wolf wren yacht yogurt zebra
""".split())

VERBS = tuple("""
accept admire answer arrive bake balance behave borrow bounce breathe build
calculate carry celebrate change charge chase climb collect compare complain
cook count crawl dance decide deliver describe design discover dream drift earn
embrace enjoy escape explain explore fetch float fold follow gather giggle
glide govern guard guess hover hurry imagine improve invent invite juggle jump
knit laugh launch listen measure melt mend migrate narrate navigate notice
observe obtain offer paint polish pour predict promise protect pursue question
recall recover reflect relax remember repair rescue roam sail scatter search
settle shiver sketch sparkle stumble swim teach travel tumble unfold vanish
wander whisper wonder yawn
""".split())

# Real words first, in a fixed order, each once.
WORDS = tuple(dict.fromkeys(ADJECTIVES + NOUNS + VERBS))

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
PSEUDO_COUNT = (len(_CONSONANTS) ** 3) * (len(_VOWELS) ** 2)  # 145,800


def pseudo_word(index: int) -> str:
  """The index-th consonant-vowel-consonant-vowel-consonant word ("bakor")."""
  letters = []
  for alphabet in (_CONSONANTS, _VOWELS, _CONSONANTS, _VOWELS, _CONSONANTS):
    index, digit = divmod(index, len(alphabet))
    letters.append(alphabet[digit])
  return "".join(letters)


def vocabulary(rng: np.random.Generator, n: int) -> list[str]:
  """n distinct lower-case words: a random order of ``WORDS``, then random
  pseudo-words (none equal to a real word) when n exceeds ``len(WORDS)``."""
  words = [WORDS[i] for i in rng.permutation(len(WORDS))[:n]]
  extra = n - len(words)
  if extra > 0:
    if extra > PSEUDO_COUNT - len(WORDS):
      raise ValueError(f"asked for {n} distinct words; at most "
                       f"{PSEUDO_COUNT} exist")
    real = set(WORDS)
    # Drawing a few spare indices covers the pseudo-words that are real words.
    picks = rng.choice(PSEUDO_COUNT, size=min(PSEUDO_COUNT, extra + 256),
                       replace=False)
    fresh = (w for w in map(pseudo_word, picks.tolist()) if w not in real)
    words += itertools.islice(fresh, extra)
  return words


def keys(rng: np.random.Generator, n: int) -> list[str]:
  """n distinct RULER-style keys "adjective-noun"."""
  picks = rng.choice(len(ADJECTIVES) * len(NOUNS), size=n, replace=False)
  return [f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}"
          for i in picks.tolist()]


def noise_units(n: int) -> list[str]:
  """The first n sentences of the repeated noise filler, each with its " "."""
  return [" " + NOISE[i % len(NOISE)] for i in range(n)]


# ------------------------------------------------------------ natural text

# Doc-rich packages read besides the top-level modules; missing ones are skipped
# (distutils and lib2to3 are gone in newer Pythons).
_PACKAGES = ("asyncio", "collections", "concurrent", "ctypes", "curses", "dbm",
             "email", "html", "http", "idlelib", "importlib", "json", "logging",
             "multiprocessing", "sqlite3", "tkinter", "tomllib", "unittest",
             "urllib", "wsgiref", "xml", "xmlrpc", "zoneinfo", "lib2to3",
             "distutils", "ensurepip", "venv")
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
_STRING = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)
_COMMENTS = re.compile(r"(?:^[ \t]*# .*\n)+", re.M)
_CODE = re.compile(r">>>|::|[{}=_\\*`|\[\]<>#@$%^~]|\d{4}|\(\)|\.\.\.|https?:"
                   r"|XXX|TODO")


def _prose(block: str) -> str | None:
  """The block as one line of prose, or None when it looks like code or markup."""
  block = textwrap.dedent(block).strip("\n")
  if any(line[:1].isspace() for line in block.split("\n")):
    return None  # nested indentation: code samples, tables, argument lists
  text = " ".join(block.split())
  if (len(text) < 60 or not text[0].isupper() or not text.endswith(".")
      or not text.isascii() or _CODE.search(text)):
    return None
  return text


@functools.cache
def natural_paragraphs() -> tuple[str, ...]:
  """Prose paragraphs of the standard library, in a fixed order (see module doc)."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(root.glob("*.py"))
  for package in _PACKAGES:
    files += sorted(f for f in (root / package).rglob("*.py")
                    if not _SKIP_PARTS & set(f.relative_to(root).parts))
  blocks = []
  for path in files:
    source = path.read_text(encoding="utf-8", errors="replace")
    for match in _STRING.finditer(source):
      blocks += re.split(r"\n\s*\n", match.group(1) or match.group(2) or "")
    for match in _COMMENTS.finditer(source):
      blocks.append(re.sub(r"^[ \t]*# ?", "", match.group(0), flags=re.M))
  topics = root / "pydoc_data" / "topics.py"
  if topics.exists():  # the language reference as plain text, a dict literal
    tree = ast.parse(topics.read_text(encoding="utf-8"))
    table = next((ast.literal_eval(node.value) for node in tree.body
                  if isinstance(node, ast.Assign)), {})
    for name in sorted(table):
      blocks += re.split(r"\n\s*\n", table[name])
  paragraphs = tuple(dict.fromkeys(p for p in map(_prose, blocks) if p))
  if len(paragraphs) < 100:
    raise RuntimeError(f"found only {len(paragraphs)} prose paragraphs under "
                       f"{root}; the 'natural' haystack needs the stdlib sources")
  return paragraphs


@functools.cache
def _natural_stream() -> tuple[tuple[str, ...], tuple[int, ...]]:
  """All natural units in order, and the unit index where each paragraph starts."""
  units, starts = [], []
  for paragraph in natural_paragraphs():
    words = paragraph.split()
    starts.append(len(units))
    units.append("\n" + words[0])
    units += [" " + w for w in words[1:]]
  return tuple(units), tuple(starts)


def natural_start(rng: np.random.Generator) -> int:
  """A random paragraph start: where an example's natural filler begins."""
  _, starts = _natural_stream()
  return starts[int(rng.integers(len(starts)))]


def natural_units(start: int, n: int) -> list[str]:
  """n natural units from unit index ``start``, wrapping around the corpus."""
  units, _ = _natural_stream()
  out = list(units[start:start + n])
  while len(out) < n:
    out += units[:n - len(out)]
  return out
