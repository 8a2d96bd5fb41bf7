"""Caption text normalisation for CHAIR: word tokenisation and singularisation.

The CHAIR reference (LisaAnne/Hallucination, Maxlinn/CHAIR-metric-standalone) runs nltk's
``word_tokenize`` (punkt sentence split + the improved Treebank word tokenizer) on the lower-cased
caption and Pattern 3.6's ``singularize`` on every token. Neither can run offline here (punkt's model
is a download; Pattern 3.6 is not on PyPI), so this module re-implements their observable behaviour:

* :func:`word_tokenize` splits on whitespace, then treats each whitespace chunk like the Treebank
  tokenizer does (punctuation, quotes, clitics, contractions). A chunk's final period is split off only
  where a sentence ends (punkt: not after an ellipsis, a listed abbreviation, or a number / single letter
  followed by a lower-case word). Chunks are cached, so long logs tokenise fast.
* :func:`singularize` follows Pattern's order of checks (uninflected suffixes, ``-ie`` words, irregular
  plurals, suffix rules), quirks included: ``glass`` -> ``glas``, ``bus`` -> ``bu``, ``ties`` -> ``ty``.
* :func:`metrics.english.singularize_lemma` is the corrected variant used by CHAIR's ``lemma`` mode.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["IE_WORDS", "word_tokenize", "singularize"]

# ---------------------------------------------------------------------------------------------------
# Word tokenisation
# ---------------------------------------------------------------------------------------------------

# Abbreviations after which punkt's English model does not end a sentence (only those that occur in
# image descriptions; none of them is, or singularises to, a COCO object word).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs inc ltd co corp ave prof ft p.m a.m u.s u.k e.g i.e etc".split()
)
_CLOSERS = "\"')]}"  # punkt moves these, when they follow a sentence end, into that sentence
_NOT_WORD_START = "(\"`{[:;&#*@)}]-,"
_SENTENCE_END = re.compile(r"[.?!]")
_PUNKT_NON_WORD = ")\";}]*:@'({[!?"  # characters that end a punkt word
_INNER_BREAK = re.compile(r"[?!]|[^.]\.[)\";}\]*:@'({\[!?]")  # a sentence end inside a chunk
# After a chunk's last sentence-end character, these (no space) start the next sentence.
_GLUED_START = re.compile(r"[;*:@({\[]|[)\"'\]}]+[^)\"'\]}]")
_NUMBER = re.compile(r"-?[.,]?\d[\d,.\-]*\.?")
_INITIAL = re.compile(r"[^\W\d]\.", re.UNICODE)

# Substitutions applied, in order, to " chunk " (a whitespace-free piece of one sentence).
_OPENING = [
    (re.compile(r"([«“‘„]|`+)"), r" \1 "),
    (re.compile(r"([ (\[{<])(\"|'')"), r"\1 `` "),
    (re.compile(r"(')(?!re|ve|ll|m|t|s|d|n)(\w)\b"), r"\1 \2"),
]
_FINAL_PERIOD = re.compile(r"([^.])(\.)([\]\)}>\"'»”’]*) $")
_PUNCT = [
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&?!*\u2012-\u2015\]\[(){}<>]"), r" \g<0> "),
    (re.compile(r"--"), r" -- "),
    (re.compile(r"([^'])' "), r"\1 ' "),
]


def _split_groups(match: re.Match[str]) -> str:
    """Separate the matched groups of a contraction by spaces ("gonna" -> " gon na ")."""
    return " " + " ".join(g for g in match.groups() if g) + " "


_CLOSING = [
    (re.compile(r"([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"([^' ])('s|'m|'d|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'re|'ve|n't) "), r"\1 \2 "),
    (re.compile(r"\b(can)(not)\b"), r" \1 \2 "),
    (re.compile(r"\b(d)('ye)\b|\b(gim)(me)\b|\b(lem)(me)\b|\b(gon)(na)\b|\b(got)(ta)\b|\b(more)('n)\b"), _split_groups),
    (re.compile(r"\b(wan)(na)(?=\s)"), r" \1 \2 "),
    (re.compile(r" ('t)(is|was)\b"), r" \1 \2 "),
]


@lru_cache(maxsize=1 << 16)
def _chunk_tokens(chunk: str, sentence_end: bool) -> tuple[str, ...]:
    """Tokens of one whitespace-free chunk; ``sentence_end``: the chunk closes a sentence."""
    text = f" {chunk} "
    for pattern, repl in _OPENING:
        text = pattern.sub(repl, text)
    if sentence_end:
        text = _FINAL_PERIOD.sub(r"\1 \2 \3 ", text)
    for pattern, repl in _PUNCT:
        text = pattern.sub(repl, text)
    text = " " + " ".join(text.split()) + " "
    for pattern, repl in _CLOSING:
        text = pattern.sub(repl, text)
    return tuple(text.split())


def _split_glued(chunk: str, last: bool) -> list[str]:
    """Split a chunk where punkt starts a new sentence inside it, e.g. ``process.;`` or ``dog.)the``.

    punkt's candidates are ``.``/``?``/``!`` followed by punctuation or by a space and another word
    (so not at the end of the text); of several candidates in one chunk only the last one counts.
    """
    candidates = [
        m.start()
        for m in _SENTENCE_END.finditer(chunk)
        if (m.end() < len(chunk) and chunk[m.end()] in _PUNKT_NON_WORD) or (m.end() == len(chunk) and not last)
    ]
    if not candidates or candidates[-1] == len(chunk) - 1:
        return [chunk]
    pos = candidates[-1]
    if chunk[pos] == "." and (pos == 0 or chunk[pos - 1] == "."):  # an ellipsis ends nothing
        return [chunk]
    rest = chunk[pos + 1 :]
    return [chunk[: pos + 1], rest] if _GLUED_START.match(rest) else [chunk]


def _last_punkt_word(core: str) -> str:
    """punkt's last word of ``core``: a non-word character ends a word and may start the next one."""
    cut = max(core.rfind(ch) for ch in _PUNKT_NON_WORD)
    word = core if cut < 0 else (core[cut + 1 :] if core[cut] in _NOT_WORD_START else core[cut:])
    return word.lstrip(_NOT_WORD_START)


def _ends_sentence(chunk: str, next_chunk: str | None) -> bool:
    """Whether punkt would end a sentence after ``chunk`` (its final period then splits off)."""
    if next_chunk is None:
        return True
    core = chunk.rstrip(_CLOSERS)
    if not core.endswith(".") or core.endswith(".."):
        return False
    if next_chunk.strip(_CLOSERS) == "" and '"' in next_chunk:
        # The quote joins this sentence and becomes an opening quote, which the final-period rule
        # does not skip: the period stays attached (nltk: 'reads " special. " the' -> 'special.').
        return False
    if _INNER_BREAK.search(core[:-1]):
        return True  # punkt breaks at the period when its context already holds a sentence end
    word = _last_punkt_word(core)
    stem = word[:-1]
    if stem in _ABBREVIATIONS or stem.rsplit("-", 1)[-1] in _ABBREVIATIONS:
        return False
    followed_by_word = chunk.endswith(".")  # no closer between the period and the next chunk
    if followed_by_word and next_chunk[:1].islower() and (_NUMBER.fullmatch(word) or _INITIAL.fullmatch(word)):
        return False
    return True


def word_tokenize(text: str) -> list[str]:
    """Split ``text`` into words like nltk's ``word_tokenize`` (English punkt + Treebank rules).

    >>> word_tokenize("a man's dog, two cats. the cat isn't on the sofa...")
    ['a', 'man', "'s", 'dog', ',', 'two', 'cats', '.', 'the', 'cat', 'is', "n't", 'on', 'the', 'sofa', '...']
    """
    raw = text.split()
    chunks: list[str] = []
    for i, chunk in enumerate(raw):
        if _has_sentence_end(chunk):
            chunks.extend(_split_glued(chunk, i == len(raw) - 1))
        else:
            chunks.append(chunk)
    tokens: list[str] = []
    for i, chunk in enumerate(chunks):
        # Only a chunk ending in a period (maybe before closers) can end a sentence with a split-off period.
        end = _has_sentence_end(chunk) and _ends_sentence(chunk, chunks[i + 1] if i + 1 < len(chunks) else None)
        tokens.extend(_chunk_tokens(chunk, end))
    return tokens


def _has_sentence_end(chunk: str) -> bool:
    return "." in chunk or "?" in chunk or "!" in chunk


# ---------------------------------------------------------------------------------------------------
# Singularisation (Pattern 3.6 behaviour)
# ---------------------------------------------------------------------------------------------------

# Words Pattern leaves as they are; a word is also kept when it is a *suffix* of one of them
# (Pattern tests ``listed.endswith(word)``), so e.g. "s", "ice" and "ter" stay unchanged.
_UNINFLECTED = (
    "bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn high-jinks "
    "proceedings whiting britches eland homework rabies wildebeest carp elk innings salmon chassis "
    "flounder jackanapes scissors christmas gallows mackerel series clippers georgia measles shears cod "
    "graffiti mews species contretemps mumps swine corps news swiss "
    # uncountable nouns
    "advice equipment happiness luggage software bread fruit information mathematics progress "
    "understanding butter furniture ketchup mayonnaise research water cheese garbage knowledge meat rice "
    "electricity gravel love mustard sand"
).split()
_KEEP_SUFFIXES = frozenset(word[i:] for word in _UNINFLECTED for i in range(len(word) + 1))

# "-ie" words whose plural only loses nothing: "<word>s" is returned unchanged. Pattern lists "pie" and
# "tie" as "^pie"/"^tie", which never match, hence "ties" -> "ty".
IE_WORDS = (
    "alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie beanie eyrie "
    "indie oldie stoolie yuppie birdie freebie junkie sweetie zombie bogie goonie laddie pixie techie "
    "bombie groupie laramie quickie collie hankie lingerie reverie toughie cookie hippie meanie rookie "
    "valkyrie"
).split()
_IE_PLURALS = tuple(word + "s" for word in IE_WORDS)

# Irregular plural suffixes, tried in this order (first suffix match wins: "women" -> "woman",
# "four" -> "fmy" through "our" -> "my").
_IRREGULAR: tuple[tuple[str, str], ...] = tuple(
    pair.split(":")
    for pair in (
        "atlantes:atlas atlases:atlas axes:axe beeves:beef brethren:brother children:child "
        "corpora:corpus corpuses:corpus ephemerides:ephemeris feet:foot ganglia:ganglion geese:goose "
        "genera:genus genii:genie graffiti:graffito helves:helve kine:cow leaves:leaf loaves:loaf "
        "men:man mongooses:mongoose monies:money moves:move mythoi:mythos numena:numen "
        "occipita:occiput octopodes:octopus opera:opus opuses:opus our:my oxen:ox penes:penis "
        "penises:penis people:person sexes:sex soliloquies:soliloquy teeth:tooth testes:testis "
        "trilbys:trilby turves:turf zoa:zoon"
    ).split()
)

# Suffix rules, first match wins. Each is (pattern, replacement); groups that did not take part in the
# match are replaced by "" (only the "-ses" alternation below has such groups).
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"(.)ae$", r"\1a"),
        (r"(.)itis$", r"\1itis"),
        (r"(.)eaux$", r"\1eau"),
        (r"(quiz)zes$", r"\1"),
        (r"(matr)ices$", r"\1ix"),
        (r"(ap|vert|ind)ices$", r"\1ex"),
        (r"^(ox)en", r"\1"),  # not anchored at the end in Pattern
        (r"(alias|status)es$", r"\1"),
        (r"([cioprtv|])i$", r"\1us"),  # Pattern's "[octop|vir]" is a character class
        (r"(cris|ax|test)es$", r"\1is"),
        (r"(shoe)s$", r"\1"),
        (r"(o)es$", r"\1"),
        (r"(bus)es$", r"\1"),
        (r"([ml|])ice$", r"\1ouse"),
        (r"(x|ch|ss|sh)es$", r"\1"),
        (r"(m)ovies$", r"\1ovie"),
        (r"(.)ombies$", r"\1ombie"),
        (r"(s)eries$", r"\1eries"),
        (r"([^aeiouy]|qu)ies$", r"\1y"),
        (r"([aeo]l)ves$", r"\1f"),
        (r"([^d]ea)ves$", r"\1f"),
        (r"arves$", "arf"),
        (r"erves$", "erve"),
        (r"([nlw]i)ves$", r"\1fe"),
        (r"([lr])ves$", r"\1f"),
        (r"([aeo])ves$", r"\1ve"),
        (r"(sive)s$", r"\1"),
        (r"(tive)s$", r"\1"),
        (r"(hive)s$", r"\1"),
        (r"([^f])ves$", r"\1fe"),
        (r"(^analy)ses$", r"\1sis"),
        (r"((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
        (r"(.)opses$", r"\1opsis"),
        (r"(.)yses$", r"\1ysis"),
        (r"(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
        (r"(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
        (r"(.)oses$", r"\1osis"),
        (r"([ti])a$", r"\1um"),
        (r"(n)ews$", r"\1ews"),
        (r"s$", ""),
    )
)

# Second halves of "x-in-law"-style compounds: only the first part is singularised.
_PREPOSITIONS = frozenset(
    "about before during of till above behind except off to across below for on under after beneath "
    "from onto until among beside in out unto around besides into over upon at between near since "
    "with athwart betwixt beyond but by".split()
)


def _apply_rule(pattern: re.Pattern[str], repl: str, word: str) -> str:
    def expand(m: re.Match[str]) -> str:
        out = repl
        for k, group in enumerate(m.groups(), start=1):
            out = out.replace(f"\\{k}", group or "")
        return out

    return pattern.sub(expand, word)


@lru_cache(maxsize=1 << 16)
def singularize(word: str) -> str:
    """Singular of an (already lower-cased) English noun, as Pattern 3.6's ``singularize`` returns it.

    >>> [singularize(w) for w in ["dogs", "people", "knives", "glasses", "glass", "bus", "ties", "skis"]]
    ['dog', 'person', 'knife', 'glass', 'glas', 'bu', 'ty', 'ski']
    """
    if "-" in word:
        parts = word.split("-")
        if parts[1] in _PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    w = word.lower()
    if w in _KEEP_SUFFIXES:
        return word
    if w.endswith(_IE_PLURALS):
        return w
    for plural, singular in _IRREGULAR:
        if w.endswith(plural):
            return word[: len(word) - len(plural)] + singular
    for pattern, repl in _RULES:
        if pattern.search(word):
            return _apply_rule(pattern, repl, word)
    return word
