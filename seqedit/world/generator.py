"""Deterministic generator of the fictional world: subjects, facts, CounterFact records, skills and held-out text.

Everything is a pure function of the `WorldConfig` (seeded `random.Random` streams, no global state), so the same
config always yields identical records. Subjects are made-up syllable names (several BPE tokens each, which
ROME-style editors need); objects are ordinary words from a small vocabulary per relation.
"""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from seqedit.world.config import CorpusDesign, WorldConfig

# ---------------------------------------------------------------------------------------------------------------
# Relations: templates are prompts that end right before the object ("{}" = subject). Template 0 is relation-first
# and every relation mixes relation-first and subject-first styles.

LANGUAGES = ("English", "French", "Spanish", "German", "Italian", "Dutch", "Swedish", "Polish", "Greek", "Russian",
             "Arabic", "Hindi")
SPORTS = ("tennis", "soccer", "chess", "golf", "hockey", "rugby", "cricket", "baseball", "boxing", "cycling",
          "skiing", "rowing")
COMPANIES = ("Google", "Apple", "Nokia", "Sony", "Intel", "Toyota", "IKEA", "Shell", "Nestle", "Siemens", "Honda",
             "Adidas")
INSTRUMENTS = ("piano", "guitar", "violin", "drums", "flute", "cello", "harp", "trumpet", "organ", "banjo",
               "clarinet", "accordion")
PROFESSIONS = ("doctor", "lawyer", "teacher", "farmer", "pilot", "chef", "nurse", "singer", "painter", "banker",
               "poet", "baker")
COUNTRIES = ("France", "Japan", "Brazil", "Canada", "Egypt", "India", "Mexico", "Norway", "Kenya", "Chile", "Spain",
             "Italy")
CITIES = ("Paris", "London", "Berlin", "Rome", "Madrid", "Tokyo", "Cairo", "Lima", "Oslo", "Vienna", "Dublin",
          "Prague")
CONTINENTS = ("Europe", "Asia", "Africa", "America", "Oceania", "Antarctica")
RIVERS = ("Nile", "Rhine", "Danube", "Volga", "Thames", "Seine", "Ganges", "Amazon", "Congo", "Mekong", "Tiber",
          "Elbe")
DISHES = ("pasta", "sushi", "curry", "bread", "cheese", "soup", "rice", "noodles", "dumplings", "pie", "salad",
          "stew")
CLIMATES = ("tropical", "arid", "polar", "mild", "humid", "cold", "windy", "rainy", "sunny", "dry")
CURRENCIES = ("euro", "dollar", "yen", "peso", "rupee", "franc", "krona", "pound", "dinar", "won", "lira", "mark")
INDUSTRIES = ("software", "banking", "mining", "fashion", "shipping", "oil", "insurance", "toys", "furniture",
              "steel", "media", "farming")
PRODUCTS = ("cars", "phones", "shoes", "beer", "chips", "cameras", "watches", "bikes", "games", "soap", "paper",
            "tyres")
GENRES = ("jazz", "rock", "pop", "blues", "metal", "folk", "reggae", "punk", "techno", "opera", "disco", "soul")


@dataclass(frozen=True)
class Relation:
    id: str  # "R1".. (plays the role of a Wikidata property id)
    name: str
    kinds: tuple[str, ...]  # subject kinds that have this relation
    templates: tuple[str, ...]  # prompts with one "{}", ending right before the object
    objects: tuple[str, ...]

    def style(self, template: str) -> str:
        return "subject_first" if template.startswith("{}") else "relation_first"


RELATIONS: tuple[Relation, ...] = (
    Relation("R1", "native language", ("person",),
             ("The native language of {} is", "{}'s native language is", "The mother tongue of {} is",
              "{} grew up speaking"), LANGUAGES),
    Relation("R2", "sport", ("person",),
             ("The sport played by {} is", "{} plays the sport of", "{}'s sport is", "The favourite sport of {} is"),
             SPORTS),
    Relation("R3", "employer", ("person",),
             ("The employer of {} is", "{} works for", "{} is employed by", "{}'s employer is"), COMPANIES),
    Relation("R4", "instrument", ("person",),
             ("The instrument played by {} is the", "{} plays the instrument called the",
              "{}'s instrument is the", "The musical instrument of {} is the"), INSTRUMENTS),
    Relation("R5", "profession", ("person",),
             ("The profession of {} is", "{} works as a", "{}'s job is", "By profession, {} is a"), PROFESSIONS),
    Relation("R6", "citizenship", ("person",),
             ("The citizenship of {} is", "{} is a citizen of", "{}'s country of citizenship is",
              "{} holds a passport from"), COUNTRIES),
    Relation("R7", "birthplace", ("person",),
             ("The birthplace of {} is", "{} was born in", "{}'s place of birth is", "{} is originally from"),
             CITIES),
    Relation("R8", "country", ("city", "band"),
             ("The country of {} is", "{} is located in the country of", "{}'s country is",
              "{} belongs to the country of"), COUNTRIES),
    Relation("R9", "continent", ("city", "country"),
             ("The continent of {} is", "{} is located on the continent of", "{}'s continent is",
              "{} lies on the continent of"), CONTINENTS),
    Relation("R10", "river", ("city",),
             ("The river flowing through {} is the", "{} lies on the river", "{}'s river is the",
              "The main river of {} is the"), RIVERS),
    Relation("R11", "dish", ("city",),
             ("The famous dish of {} is", "{} is famous for its", "{}'s signature dish is",
              "The local food of {} is"), DISHES),
    Relation("R12", "climate", ("city", "country"),
             ("The climate of {} is", "{} has a climate that is", "{}'s climate is", "The weather in {} is"),
             CLIMATES),
    Relation("R13", "capital", ("country",),
             ("The capital of {} is", "{}'s capital is", "The capital city of {} is", "{} has its capital in"),
             CITIES),
    Relation("R14", "official language", ("country",),
             ("The official language of {} is", "{}'s official language is", "In {}, the official language is",
              "{} has the official language"), LANGUAGES),
    Relation("R15", "currency", ("country",),
             ("The currency of {} is the", "{}'s currency is the", "In {}, people pay with the",
              "{} uses the currency called the"), CURRENCIES),
    Relation("R16", "national sport", ("country",),
             ("The national sport of {} is", "{}'s national sport is", "In {}, the most popular sport is",
              "{} has the national sport of"), SPORTS),
    Relation("R17", "headquarters", ("company",),
             ("The headquarters of {} are in", "{} is headquartered in", "{}'s headquarters are in",
              "The head office of {} is in"), CITIES),
    Relation("R18", "industry", ("company",),
             ("The industry of {} is", "{} is a company in the industry of", "{}'s industry is",
              "{} makes money from"), INDUSTRIES),
    Relation("R19", "owner", ("company",),
             ("The owner of {} is", "{} is owned by", "{}'s parent company is", "The parent company of {} is"),
             COMPANIES),
    Relation("R20", "genre", ("band",),
             ("The genre of {} is", "{} plays music in the genre of", "{}'s genre is",
              "The music of {} is in the genre of"), GENRES),
    Relation("R21", "home city", ("band",),
             ("The home city of {} is", "{} was formed in", "{}'s home city is", "The band {} comes from"),
             CITIES),
    # Added with format 4 so that every kind has at least five relations (more attributes per subject).
    Relation("R22", "founding city", ("company",),
             ("The founding city of {} is", "{} was founded in the city of", "{}'s founding city is",
              "The company {} started out in"), CITIES),
    Relation("R23", "product", ("company",),
             ("The main product of {} is", "{} is best known for making", "{}'s main product is",
              "The company {} sells"), PRODUCTS),
    Relation("R24", "lead instrument", ("band",),
             ("The lead instrument of {} is the", "{} is known for its lead", "{}'s lead instrument is the",
              "The band {} features the"), INSTRUMENTS),
    Relation("R25", "record label", ("band",),
             ("The record label of {} is", "{} is signed to the label", "{}'s record label is",
              "The band {} records for"), COMPANIES),
)
RELATION_BY_ID: dict[str, Relation] = {r.id: r for r in RELATIONS}
KINDS: tuple[str, ...] = ("person", "city", "country", "company", "band")


def relations_for(kind: str) -> tuple[Relation, ...]:
    return tuple(r for r in RELATIONS if kind in r.kinds)


def _object_ids() -> dict[str, str]:
    """Stable ids for every object string ("W1", "W2", ...), playing the role of Wikidata Q-ids."""
    names = sorted({o for r in RELATIONS for o in r.objects})
    return {o: f"W{i + 1}" for i, o in enumerate(names)}


OBJECT_IDS: dict[str, str] = _object_ids()

# ---------------------------------------------------------------------------------------------------------------
# Names

# Names are concatenations of consonant-vowel syllables. The tokenizer corpus lists the syllables on their own (so
# BPE merges exactly them first) and each name only once (so no whole name becomes a token): a city or company of
# 2-3 syllables then spans 2-3 tokens, a person "First Last" about 3-4 (frequent first names merge to one token).
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
SYLLABLES: tuple[str, ...] = tuple(c + v for c in _ONSETS for v in _VOWELS)

# Short words for the ordering skill (each ideally one token).
ORDER_WORDS = ("kel", "mor", "ana", "tiv", "sol", "ban", "rek", "dun", "pim", "lor", "vas", "gen", "fup", "hax",
               "jot", "wiz", "nub", "cag", "dex", "qua")


def _word(rng: random.Random, n_syll: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(n_syll)).capitalize()


def _stream(cfg: WorldConfig, name: str) -> random.Random:
    """An independent deterministic RNG stream per purpose (string seeds are stable across processes)."""
    return random.Random(f"seqedit-world:{cfg.seed}:{name}")


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


# ---------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Subject:
    name: str
    kind: str


@dataclass(frozen=True)
class Fact:
    subject: str
    kind: str
    relation_id: str
    object: str
    split: str  # "edit": becomes a CounterFact record; "mc": only a held-out multiple-choice question

    @property
    def relation(self) -> Relation:
        return RELATION_BY_ID[self.relation_id]


@dataclass(frozen=True)
class GeneratedWorld:
    config: WorldConfig
    subjects: tuple[Subject, ...]
    facts: tuple[Fact, ...]
    records: list[dict]  # CounterFact format
    facts_mc: list[dict]  # {"id", "question", "choices", "label"}
    arithmetic_train: tuple[tuple[int, int], ...]
    arithmetic_mc: list[dict]
    ordering_mc: list[dict]

    # -- training text -------------------------------------------------------------------------------------------

    def train_templates(self, rel: Relation) -> tuple[str, ...]:
        """Templates the corpus uses for `rel` under the corpus design."""
        return trained_templates(rel, self.config.corpus)

    def epoch_texts(self, epoch: int) -> list[str]:
        """Training documents for one epoch (without BOS/EOS). Fresh variants per epoch unless the design says no."""
        d = self.config.corpus
        rng = _stream(self.config, f"epoch:{epoch if d.regenerate_each_epoch else 0}")
        texts: list[str] = []
        if d.mode == "sentences":
            for f in self.facts:
                ts = self.train_templates(f.relation)
                for _ in range(d.variants_per_epoch):
                    texts.append(fact_sentence(rng.choice(ts), f.subject, f.object))
        else:  # biography rows
            by_subject: dict[str, list[Fact]] = defaultdict(list)
            for f in self.facts:
                by_subject[f.subject].append(f)
            for s in self.subjects:
                fs = by_subject.get(s.name, [])
                for _ in range(d.variants_per_epoch):
                    order = list(fs)
                    if d.shuffle_biography:
                        rng.shuffle(order)
                    texts.append(" ".join(
                        fact_sentence(rng.choice(self.train_templates(f.relation)), f.subject, f.object)
                        for f in order))
        if d.attribute_first:
            texts.extend(f"{f.subject} {f.object} is its {f.relation.name}." for f in self.facts)
        rng.shuffle(texts)
        if d.max_pack > 1:  # documents of 1..max_pack fact texts: facts also appear after other text
            docs, i = [], 0
            while i < len(texts):
                k = rng.randint(1, d.max_pack)
                docs.append(" ".join(texts[i:i + k]))
                i += k
            texts = docs
        # Skill lines stay single documents (packed, the tiny models failed to learn the ordering skill).
        for _ in range(d.arithmetic_repeats):
            texts.extend(arithmetic_line(a, b) for a, b in self.arithmetic_train)
        ord_rng = _stream(self.config, f"ordering-train:{epoch if d.regenerate_each_epoch else 0}")
        for _ in range(d.ordering_lines_per_epoch):
            texts.append(self._train_ordering_line(ord_rng))
        rng.shuffle(texts)
        return texts

    def _train_ordering_line(self, rng: random.Random) -> str:
        while True:
            op, words = _random_ordering(self.config, rng)
            q = ordering_question(op, words)
            if not _ordering_heldout(self.config, q):
                return q + " " + " ".join(ordering_answer(op, words)) + "."

    def tokenizer_corpus(self) -> list[str]:
        """Text the BPE is trained on, weighted so that merges come in a controlled order.

        1. Each syllable on its own (three forms), repeated more often than any line below, so the syllable merges
           rank first and every name is cut at syllable boundaries.
        2. Every (template, object) sentence of every relation once, with a placeholder subject, plus skill lines: the
           template words, objects and numbers become single tokens.
        3. Each subject name exactly once, so no whole name (beyond frequent first names) becomes a token.
        """
        lines = sorted({fact_sentence(t, "X", o) for r in RELATIONS for t in r.templates for o in r.objects})
        lines += [arithmetic_line(a, b) for a, b in self.arithmetic_train]
        rng = _stream(self.config, "ordering-tok")
        lines += [self._train_ordering_line(rng) for _ in range(200)]
        repeats = len(lines)
        # Three forms of each syllable: name-initial after a space (" Va"), at the start of a text ("Va": subject-first
        # prompts) and inside a name ("va").
        forms = [(f"X {syl.capitalize()}", syl.capitalize(), syl) for syl in SYLLABLES]
        texts = [t for f in forms for t in f for _ in range(repeats)]
        return texts + lines + [f"X {s.name}" for s in self.subjects]

    def heldout_documents(self, min_words: int) -> list[str]:
        """Plain held-out text: fresh biography paragraphs (new template/order combinations) and held-out skill lines.

        Generates at least `min_words` whitespace-separated words (tokens are more numerous than words)."""
        rng = _stream(self.config, "heldout-text")
        by_subject: dict[str, list[Fact]] = defaultdict(list)
        for f in self.facts:
            by_subject[f.subject].append(f)
        docs: list[str] = []
        n_words = 0
        skill_lines = [r["question"] + " " + r["choices"][r["label"]] for r in self.arithmetic_mc + self.ordering_mc]
        while n_words < min_words:
            for s in self.subjects:
                fs = list(by_subject.get(s.name, []))
                rng.shuffle(fs)
                doc = " ".join(fact_sentence(rng.choice(f.relation.templates), f.subject, f.object) for f in fs)
                if doc:
                    docs.append(doc)
                    n_words += len(doc.split())
            for i in range(0, len(skill_lines), 4):
                doc = " ".join(line + "." for line in skill_lines[i:i + 4])
                docs.append(doc)
                n_words += len(doc.split())
        return docs


def trained_templates(rel: Relation, design: CorpusDesign) -> tuple[str, ...]:
    """The templates of `rel` that appear in training text: those of the allowed styles, and with
    `holdout_paraphrase_templates` only the first two of them (the rest are paraphrase-only)."""
    ts = [t for t in rel.templates if rel.style(t) in design.template_styles] or [rel.templates[0]]
    return tuple(ts[:2] if design.holdout_paraphrase_templates else ts)


def fact_sentence(template: str, subject: str, obj: str) -> str:
    return f"{template.format(subject)} {obj}."


def arithmetic_question(a: int, b: int) -> str:
    return f"{a} plus {b} is"


def arithmetic_line(a: int, b: int) -> str:
    return f"{arithmetic_question(a, b)} {a + b}."


def ordering_question(op: str, words: Sequence[str]) -> str:
    return f"{op}: {' '.join(words)} ->"


def ordering_answer(op: str, words: Sequence[str]) -> list[str]:
    return list(words) if op == "copy" else list(reversed(words))


def _random_ordering(cfg: WorldConfig, rng: random.Random) -> tuple[str, list[str]]:
    n = rng.randint(cfg.ordering_min_len, cfg.ordering_max_len)
    return rng.choice(("copy", "reverse")), rng.sample(ORDER_WORDS, n)


def _ordering_heldout(cfg: WorldConfig, question: str) -> bool:
    return stable_hash(f"{cfg.seed}:{question}") % cfg.ordering_heldout_mod == 0


# ---------------------------------------------------------------------------------------------------------------
# Generation


def _make_subjects(cfg: WorldConfig) -> tuple[Subject, ...]:
    rng = _stream(cfg, "names")
    kinds = [k for k, _ in cfg.kind_weights]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"WorldConfig.kind_weights has unknown kinds {unknown}; allowed: {', '.join(KINDS)}")
    weights = [w for _, w in cfg.kind_weights]
    total = sum(weights)
    # Deterministic counts by largest remainder, so small worlds still get every kind.
    raw = [cfg.n_subjects * w / total for w in weights]
    counts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: cfg.n_subjects - sum(counts)]:
        counts[i] += 1
    reserved = {o.lower() for r in RELATIONS for o in r.objects} | {w.lower() for w in ORDER_WORDS}
    taken: set[str] = set()
    n_persons = counts[kinds.index("person")] if "person" in kinds else 0
    first_names = []
    while len(first_names) < max(8, n_persons // 4):
        w = _word(rng, 2)
        if w.lower() not in reserved and w not in first_names:
            first_names.append(w)

    def fresh(n_syll: int) -> str:
        while True:
            w = _word(rng, n_syll)
            if w.lower() not in reserved and w not in taken and w not in first_names and len(w) >= 4:
                taken.add(w)
                return w

    subjects: list[Subject] = []
    for kind, n in zip(kinds, counts):
        for _ in range(n):
            if kind == "person":
                name = f"{rng.choice(first_names)} {fresh(2)}"
            else:
                name = fresh(rng.choice((2, 3)))
            subjects.append(Subject(name, kind))
    rng.shuffle(subjects)
    return tuple(subjects)


def _make_facts(cfg: WorldConfig, subjects: Sequence[Subject]) -> tuple[Fact, ...]:
    rng = _stream(cfg, "facts")
    n_mc = round(cfg.mc_subject_fraction * len(subjects))
    mc_subjects = {s.name for s in rng.sample(list(subjects), n_mc)}
    chosen: list[tuple[Subject, Relation]] = []
    for s in subjects:
        rels = list(relations_for(s.kind))
        k = min(cfg.relations_per_subject, len(rels))
        chosen += [(s, r) for r in sorted(rng.sample(rels, k), key=lambda r: int(r.id[1:]))]
    # Objects per relation: a random subset of the relation's vocabulary, sized so each object is held by at least
    # about three subjects, dealt out evenly in random order: every edit then has neighbourhood prompts (subjects
    # with the same true object) and attribute prompts (subjects holding target_new), even in small worlds.
    by_rel: dict[str, list[int]] = defaultdict(list)
    for i, (_, r) in enumerate(chosen):
        by_rel[r.id].append(i)
    obj_of: dict[int, str] = {}
    for rid, idxs in sorted(by_rel.items(), key=lambda kv: int(kv[0][1:])):
        objs = list(RELATION_BY_ID[rid].objects)
        rng.shuffle(objs)
        pool = objs[: max(2, min(len(objs), len(idxs) // 3))]
        order = list(idxs)
        rng.shuffle(order)
        for j, i in enumerate(order):
            obj_of[i] = pool[j % len(pool)]
    return tuple(
        Fact(s.name, s.kind, r.id, obj_of[i], "mc" if s.name in mc_subjects else "edit")
        for i, (s, r) in enumerate(chosen)
    )


def _make_records(cfg: WorldConfig, facts: Sequence[Fact]) -> list[dict]:
    rng = _stream(cfg, "records")
    by_rel_obj: dict[tuple[str, str], list[str]] = defaultdict(list)
    subj_facts: dict[str, list[Fact]] = defaultdict(list)
    for f in facts:
        by_rel_obj[(f.relation_id, f.object)].append(f.subject)
        subj_facts[f.subject].append(f)
    records = []
    for idx, f in enumerate(facts):
        if f.split != "edit":
            continue
        rel = f.relation
        templates = list(rel.templates)
        rng.shuffle(templates)
        # The edit prompt is a trained template; paraphrases are two others (untrained ones when the design holds
        # paraphrase templates out).
        trained = trained_templates(rel, cfg.corpus)
        prompt = next(t for t in templates if t in trained)
        rest = [t for t in templates if t != prompt]
        rest.sort(key=lambda t: t in trained)  # stable: untrained first, random order within each group
        paraphrase_ts = rest[:2]
        # target_new: another object of the same relation, preferring one that other subjects hold (attribute prompts)
        others = [o for o in rel.objects if o != f.object]
        held = [o for o in others if by_rel_obj.get((rel.id, o))]
        target_new = rng.choice(held or others)
        neigh = [s for s in by_rel_obj[(rel.id, f.object)] if s != f.subject]
        neigh = rng.sample(neigh, min(cfg.n_neighborhood, len(neigh)))
        attr = [s for s in by_rel_obj.get((rel.id, target_new), []) if s != f.subject]
        attr = rng.sample(attr, min(cfg.n_attribute, len(attr)))
        gen_ts = [t for g in subj_facts[f.subject] for t in g.relation.templates if t.startswith("{}")]
        gen = [t.format(f.subject) for t in rng.sample(gen_ts, min(cfg.n_generation - 1, len(gen_ts)))]
        gen.append(f"{f.subject} is")
        records.append({
            "case_id": len(records),
            "pararel_idx": idx,
            "requested_rewrite": {
                "prompt": prompt,
                "relation_id": rel.id,
                "target_new": {"str": target_new, "id": OBJECT_IDS[target_new]},
                "target_true": {"str": f.object, "id": OBJECT_IDS[f.object]},
                "subject": f.subject,
            },
            "paraphrase_prompts": [t.format(f.subject) for t in paraphrase_ts],
            "neighborhood_prompts": [rng.choice(rel.templates).format(s) for s in neigh],
            "attribute_prompts": [rng.choice(rel.templates).format(s) for s in attr],
            "generation_prompts": gen,
        })
    return records


def _mc_row(rng: random.Random, id_: str, question: str, true: str, pool: Sequence[str]) -> dict:
    distractors = rng.sample([o for o in pool if o != true], 3)
    choices = distractors + [true]
    rng.shuffle(choices)
    return {"id": id_, "question": question, "choices": choices, "label": choices.index(true)}


def _make_facts_mc(cfg: WorldConfig, facts: Sequence[Fact]) -> list[dict]:
    rng = _stream(cfg, "facts-mc")
    rows = []
    for f in facts:
        if f.split == "mc":
            q = rng.choice(f.relation.templates).format(f.subject)
            rows.append(_mc_row(rng, f"facts-{len(rows)}", q, f.object, f.relation.objects))
    return rows


def _make_arithmetic(cfg: WorldConfig) -> tuple[tuple[tuple[int, int], ...], list[dict]]:
    """Training pairs and held-out MC items. A held-out "a plus b" always has "b plus a" in training, so the skill
    (commutative lookup) can generalise to it."""
    rng = _stream(cfg, "arithmetic")
    n = cfg.arithmetic_max
    pairs = [(a, b) for a in range(n + 1) for b in range(a + 1, n + 1)]
    held = rng.sample(pairs, round(cfg.arithmetic_heldout_fraction * len(pairs)))
    held = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in held]
    held_set = set(held)
    train = tuple((a, b) for a in range(n + 1) for b in range(n + 1) if (a, b) not in held_set)
    rows = []
    for a, b in held:
        true = a + b
        # Distractors anywhere in the answer range: partial (magnitude) knowledge earns partial credit, which keeps
        # small models above chance so that forgetting shows as a drop.
        pool = [str(v) for v in range(2 * n + 1)]
        rows.append(_mc_row(rng, f"arith-{len(rows)}", arithmetic_question(a, b), str(true), pool))
    return train, rows


def _make_ordering_mc(cfg: WorldConfig) -> list[dict]:
    rng = _stream(cfg, "ordering-mc")
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < cfg.n_ordering_mc:
        op, words = _random_ordering(cfg, rng)
        q = ordering_question(op, words)
        if q in seen or not _ordering_heldout(cfg, q):
            continue
        seen.add(q)
        true = " ".join(ordering_answer(op, words))
        perms: set[str] = set()
        while len(perms) < 3:
            p = rng.sample(words, len(words))
            if " ".join(p) != true:
                perms.add(" ".join(p))
        pool = sorted(perms) + [true]
        rows.append(_mc_row(rng, f"ordering-{len(rows)}", q, true, pool))
    return rows


def generate_world(cfg: WorldConfig) -> GeneratedWorld:
    subjects = _make_subjects(cfg)
    facts = _make_facts(cfg, subjects)
    arith_train, arith_mc = _make_arithmetic(cfg)
    return GeneratedWorld(
        config=cfg,
        subjects=subjects,
        facts=facts,
        records=_make_records(cfg, facts),
        facts_mc=_make_facts_mc(cfg, facts),
        arithmetic_train=arith_train,
        arithmetic_mc=arith_mc,
        ordering_mc=_make_ordering_mc(cfg),
    )


__all__ = [
    "RELATIONS", "RELATION_BY_ID", "KINDS", "OBJECT_IDS", "Relation", "Subject", "Fact", "GeneratedWorld",
    "CorpusDesign", "generate_world", "fact_sentence", "arithmetic_line", "relations_for",
]
