"""A small invented world of entities and facts: the knowledge every synthetic dataset is about.

Nothing can be downloaded on the machines this project is tested on, so pre-training, SFT and
evaluation all run on text generated from this world. Names are made of random syllables and
attribute values are drawn uniformly from closed sets, so no real-world knowledge (and no prior
over values) helps: a model only scores above chance on questions about the world if it learned the
facts from the generated corpus.

Every entity has a kind (country, city, person, creature, element, festival); each kind belongs to
one category, and categories double as MMLU "subjects". Some relations point at other entities (a
city lies in a country, a person was born in a city): these links give two-hop questions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

CATEGORIES: tuple[str, ...] = (
    "synthetic_geography",
    "synthetic_history",
    "synthetic_biology",
    "synthetic_chemistry",
    "synthetic_culture",
)


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple; `object` is a value or another entity's name."""

    subject: str
    relation: str
    object: str
    category: str


@dataclass(frozen=True)
class Relation:
    """An attribute of one entity kind, with the sentences that state and ask it.

    Templates use `{s}` for the subject and `{o}` for the object. Question templates take a
    *reference* for `{s}` ("the country Vorlan", or a description such as "the country in which
    the city Brailon lies"), so the same template serves one-hop and two-hop questions.
    """

    name: str
    kind: str
    statements: tuple[str, ...]  # paraphrases stating the fact, `{s}` is the bare name
    questions: tuple[str, ...]  # paraphrases asking for `{o}`; the first is the canonical one
    values: tuple[str, ...] = ()  # closed value set (empty for links)
    target_kind: str | None = None  # for links: the kind of entity the object is
    description: str | None = None  # for links: "the city where {s} was born", used in two-hop questions


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str
    attributes: dict[str, str] = field(hash=False)

    @property
    def reference(self) -> str:
        """How questions refer to the entity: its kind then its name ("the creature Zorblat")."""
        return f"the {self.kind} {self.name}"


@dataclass
class World:
    seed: int
    entities: list[Entity]
    facts: list[Fact]
    relations: dict[str, Relation]  # relation name -> Relation, in a fixed order

    def __post_init__(self) -> None:
        self.by_name: dict[str, Entity] = {e.name: e for e in self.entities}
        self._facts_by_subject: dict[str, list[Fact]] = {e.name: [] for e in self.entities}
        for fact in self.facts:
            self._facts_by_subject[fact.subject].append(fact)

    @property
    def categories(self) -> list[str]:
        return [c for c in CATEGORIES if any(f.category == c for f in self.facts)]

    def of_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]

    def candidates(self, relation: Relation) -> list[str]:
        """Every object the relation can take: the value set, or all names of the linked kind."""
        if relation.target_kind is not None:
            return [e.name for e in self.of_kind(relation.target_kind)]
        return list(relation.values)

    def facts_about(self, name: str) -> list[Fact]:
        return self._facts_by_subject[name]

    def category_of(self, name: str) -> str:
        return KIND_CATEGORY[self.by_name[name].kind]


KIND_CATEGORY: dict[str, str] = {
    "country": "synthetic_geography",
    "city": "synthetic_geography",
    "person": "synthetic_history",
    "creature": "synthetic_biology",
    "element": "synthetic_chemistry",
    "festival": "synthetic_culture",
}
# Share of the entities given to each kind (sums to 64, the default world size).
KIND_WEIGHTS: dict[str, int] = {
    "country": 8,
    "city": 14,
    "person": 14,
    "creature": 10,
    "element": 9,
    "festival": 9,
}
# Every kind needs at least 4 entities so that links have 3 distractors of the right kind.
MIN_PER_KIND = 4

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
MONTHS = ("January", "March", "April", "June", "July", "September", "October", "December")


def _r(
    name: str, kind: str, statements, questions, values=(), target_kind=None, description=None
) -> Relation:
    return Relation(name, kind, tuple(statements), tuple(questions), tuple(values), target_kind, description)


def _relations(rivers: tuple[str, ...], languages: tuple[str, ...]) -> list[Relation]:
    """All relations, in a fixed order. Rivers and languages are invented names (seeded)."""
    return [
        # country
        _r("climate", "country",
           ["{s} has a {o} climate.", "The climate of {s} is {o}.", "The weather in {s} is {o} most of the year."],
           ["What is the climate of {s}?", "What kind of climate does {s} have?"],
           ("arid", "tropical", "temperate", "polar", "alpine", "humid", "windy", "mild")),
        _r("currency", "country",
           ["The currency of {s} is the {o}.", "People in {s} pay with the {o}.", "{s} uses the {o} as its money."],
           ["What is the currency of {s}?", "Which money is used in {s}?"],
           ("florin", "crown", "mark", "shell", "talon", "ducat", "pearl", "tallow")),
        _r("language", "country",
           ["The people of {s} speak {o}.", "{o} is the language of {s}.", "In {s} most people speak {o}."],
           ["Which language is spoken in {s}?", "What language do the people of {s} speak?"],
           languages),
        _r("flag", "country",
           ["The flag of {s} is {o}.", "{s} flies a {o} flag.", "The national flag of {s} is mostly {o}."],
           ["What colour is the flag of {s}?", "Which colour is the national flag of {s}?"],
           COLOURS),
        _r("capital", "country",
           ["The capital of {s} is {o}.", "{o} is the capital city of {s}.", "{s} is governed from its capital, {o}."],
           ["What is the capital of {s}?", "Which city is the capital of {s}?"],
           target_kind="city", description="the capital of {s}"),
        # city
        _r("country", "city",
           ["{s} is a city in {o}.", "The city of {s} lies in {o}.", "{s} belongs to the country of {o}."],
           ["In which country is {s}?", "Which country does {s} belong to?"],
           target_kind="country", description="the country in which {s} lies"),
        _r("river", "city",
           ["The river {o} flows through {s}.", "{s} was built on the banks of the {o}.", "{s} lies on the river {o}."],
           ["Which river flows through {s}?", "On which river does {s} lie?"],
           rivers),
        _r("founded", "city",
           ["{s} was founded in {o}.", "The city of {s} dates from the year {o}.", "Settlers founded {s} in {o}."],
           ["In which year was {s} founded?", "When was {s} founded?"],
           ("1120", "1245", "1310", "1388", "1452", "1517", "1603", "1689")),
        _r("industry", "city",
           ["The main trade of {s} is {o}.", "Most people in {s} work in {o}.", "{s} is known for its {o}."],
           ["What is the main industry of {s}?", "What do most people in {s} work in?"],
           ("fishing", "mining", "weaving", "farming", "glassmaking", "shipbuilding", "brewing", "pottery")),
        # person
        _r("profession", "person",
           ["{s} worked as a {o}.", "{s} was a famous {o}.", "By trade, {s} was a {o}."],
           ["What was the profession of {s}?", "What did {s} work as?"],
           ("painter", "sailor", "astronomer", "merchant", "poet", "physician", "architect", "blacksmith")),
        _r("born_in", "person",
           ["{s} was born in {o}.", "The birthplace of {s} is {o}.", "{s} grew up in the city of {o}."],
           ["Where was {s} born?", "In which city was {s} born?"],
           target_kind="city", description="the city where {s} was born"),
        _r("birth_year", "person",
           ["{s} was born in the year {o}.", "The year of birth of {s} is {o}.", "{s} came into the world in {o}."],
           ["In which year was {s} born?", "When was {s} born?"],
           ("1702", "1719", "1736", "1751", "1768", "1783", "1797", "1812")),
        _r("instrument", "person",
           ["{s} played the {o}.", "In the evenings {s} liked to play the {o}.", "{s} was skilled at the {o}."],
           ["Which instrument did {s} play?", "What instrument was {s} skilled at?"],
           ("lute", "harp", "flute", "drum", "fiddle", "horn", "zither", "bagpipe")),
        # creature
        _r("colour", "creature",
           ["{s} is {o}.", "The fur of {s} is {o}.", "You can spot {s} by its {o} colour."],
           ["What colour is {s}?", "Which colour does {s} have?"],
           COLOURS),
        _r("habitat", "creature",
           ["{s} lives in the {o}.", "The home of {s} is the {o}.", "{s} is found in the {o}."],
           ["Where does {s} live?", "What is the habitat of {s}?"],
           ("forest", "desert", "swamp", "tundra", "mountains", "grassland", "caves", "reef")),
        _r("diet", "creature",
           ["{s} eats {o}.", "The food of {s} is {o}.", "{s} feeds mostly on {o}."],
           ["What does {s} eat?", "What is the food of {s}?"],
           ("berries", "insects", "fish", "seeds", "leaves", "mushrooms", "roots", "snails")),
        _r("legs", "creature",
           ["{s} has {o} legs.", "{s} walks on {o} legs.", "Every {s} has exactly {o} legs."],
           ["How many legs does {s} have?", "On how many legs does {s} walk?"],
           ("two", "four", "six", "eight", "ten", "twelve")),
        _r("native_to", "creature",
           ["{s} is native to {o}.", "{s} comes from {o}.", "The wild {s} lives only in {o}."],
           ["Which country is {s} native to?", "Where does {s} come from?"],
           target_kind="country", description="the country that {s} is native to"),
        # element
        _r("element_colour", "element",
           ["Pure {s} is {o}.", "The element {s} has a {o} colour.", "A sample of {s} looks {o}."],
           ["What colour is {s} in its pure form?", "Which colour does {s} have?"],
           COLOURS),
        _r("state", "element",
           ["At room temperature {s} is a {o}.", "{s} is a {o} under normal conditions.", "Normally {s} is found as a {o}."],
           ["Is {s} a solid, a liquid, a gas or a powder at room temperature?", "In what state is {s} normally found?"],
           ("solid", "liquid", "gas", "powder")),
        _r("discovered_by", "element",
           ["{s} was discovered by {o}.", "{o} discovered {s}.", "The discoverer of {s} was {o}."],
           ["Who discovered {s}?", "Who was the discoverer of {s}?"],
           target_kind="person", description="the person who discovered {s}"),
        _r("use", "element",
           ["{s} is used for {o}.", "People use {s} for {o}.", "The main use of {s} is {o}."],
           ["What is {s} used for?", "What is the main use of {s}?"],
           ("lamps", "medicine", "coins", "glass", "dyes", "fuel", "tools", "jewellery")),
        # festival
        _r("month", "festival",
           ["{s} is celebrated in {o}.", "Every year in {o} people celebrate {s}.", "The feast of {s} falls in {o}."],
           ["In which month is {s} celebrated?", "When is {s} celebrated?"],
           MONTHS),
        _r("held_in", "festival",
           ["{s} is held in {o}.", "The city of {o} hosts {s}.", "Crowds gather in {o} for {s}."],
           ["Where is {s} held?", "Which city hosts {s}?"],
           target_kind="city", description="the city that hosts {s}"),
        _r("food", "festival",
           ["During {s} people eat {o}.", "The traditional dish of {s} is {o}.", "No {s} is complete without {o}."],
           ["What do people eat during {s}?", "What is the traditional dish of {s}?"],
           ("honey cake", "roast goose", "plum bread", "fish stew", "rice balls", "cheese pie", "nut soup", "apple tart")),
        _r("founded_by", "festival",
           ["{s} was started by {o}.", "{o} founded {s}.", "The first {s} was organised by {o}."],
           ["Who started {s}?", "Who founded {s}?"],
           target_kind="person", description="the person who started {s}"),
    ]  # fmt: skip


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "st", "th", "sh", "tr", "pl", "fl")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ae")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "x")


def _invent_name(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def invent_names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """`count` new distinct invented names (2-3 syllables) not in `taken`; adds them to `taken`."""
    names: list[str] = []
    while len(names) < count:
        name = _invent_name(rng, rng.choice((2, 2, 3)))
        if name.lower() not in taken:
            taken.add(name.lower())
            names.append(name)
    return names


def kind_counts(num_entities: int) -> dict[str, int]:
    """Split `num_entities` over the kinds in proportion to KIND_WEIGHTS, at least MIN_PER_KIND each."""
    minimum = MIN_PER_KIND * len(KIND_WEIGHTS)
    if num_entities < minimum:
        raise ValueError(f"num_entities={num_entities} is too small: the world needs at least {minimum} "
                         f"({MIN_PER_KIND} per kind, so every question has 3 distractors)")  # fmt: skip
    total = sum(KIND_WEIGHTS.values())
    counts = {k: max(MIN_PER_KIND, num_entities * w // total) for k, w in KIND_WEIGHTS.items()}
    # Hand out the rounding remainder (or take back the excess) in kind order, deterministically.
    kinds = list(KIND_WEIGHTS)
    i = 0
    while sum(counts.values()) != num_entities:
        k = kinds[i % len(kinds)]
        if sum(counts.values()) < num_entities:
            counts[k] += 1
        elif counts[k] > MIN_PER_KIND:
            counts[k] -= 1
        i += 1
    return counts


def relations_for_seed(seed: int) -> list[Relation]:
    """The relation table of the world with this seed (invented river and language names differ)."""
    rng = random.Random(f"values-{seed}")
    taken = {v.lower() for r in _relations((), ()) for v in r.values}
    rivers = tuple(invent_names(rng, 8, taken))
    # "Vorlan" -> "Vorlanish", "Plastei" -> "Plasteish"
    languages = tuple(n + ("sh" if n[-1] in "aeiou" else "ish") for n in invent_names(rng, 8, taken))
    return _relations(rivers, languages)


def _assign_attributes(
    rng: random.Random, names: dict[str, list[str]], relations: list[Relation]
) -> dict[str, dict[str, str]]:
    """Draw every attribute uniformly; links keep the world consistent (a capital lies in its country)."""
    attrs: dict[str, dict[str, str]] = {n: {} for kind in names.values() for n in kind}
    countries = names["country"]
    # Cities are dealt round-robin over a shuffled country order so every country has a city (its capital).
    order = rng.sample(countries, len(countries))
    for i, city in enumerate(names["city"]):
        attrs[city]["country"] = order[i % len(order)]
    for country in countries:
        own_cities = [c for c in names["city"] if attrs[c]["country"] == country]
        attrs[country]["capital"] = rng.choice(own_cities)
    for rel in relations:
        if rel.name in ("country", "capital"):
            continue
        pool = names[rel.target_kind] if rel.target_kind else list(rel.values)
        for subject in names[rel.kind]:
            attrs[subject][rel.name] = rng.choice(pool)
    return attrs


def build_world(seed: int = 0, num_entities: int = 64) -> World:
    """A deterministic world: same (seed, num_entities), same entities and facts in the same order."""
    relations = relations_for_seed(seed)
    rng = random.Random(f"world-{seed}-{num_entities}")
    taken = {v.lower() for r in relations for v in r.values}
    names = {kind: invent_names(rng, n, taken) for kind, n in kind_counts(num_entities).items()}
    attrs = _assign_attributes(rng, names, relations)
    entities = [Entity(n, kind, attrs[n]) for kind, kind_names in names.items() for n in kind_names]
    facts = [
        Fact(e.name, rel.name, e.attributes[rel.name], KIND_CATEGORY[e.kind])
        for e in entities
        for rel in relations
        if rel.kind == e.kind
    ]
    return World(seed=seed, entities=entities, facts=facts, relations={r.name: r for r in relations})
