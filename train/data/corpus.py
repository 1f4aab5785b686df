"""The offline demo corpus `demo-stories`: simple English stories generated from a fixed seed.

Nothing is downloaded or shipped: the same code and seed give the same bytes on every machine.
The stories have structure a small model can learn (templates, a cast that recurs within a story)
and long-range dependencies a longer context helps with: a story's hero, pet, treasure and secret
word are introduced at the start and recalled paragraphs (in long stories, thousands of tokens)
later. About one story in twenty is long, so evaluation at 4x the demo's training length has text.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from train.contract import atomic_write_text

VERSION = 1
SPLIT_SEEDS = {"train": 1234, "validation": 5678}
SPLIT_BYTES = {"train": 12_000_000, "validation": 1_200_000}

GIRLS = ("Mia Lily Emma Zoe Ava Lucy Nora Ella Ruby Rosa Anna Maya Ivy Lena Hana Sara Tia Nina Amy "
         "Kate Jade Luna Elsa Greta Olive Daisy Hazel Iris Pearl Wren").split()
BOYS = ("Tom Ben Sam Max Leo Jack Finn Omar Ravi Tim Noah Eli Hugo Otto Felix Jonas Kai Milo Ned "
        "Paul Theo Ivan Arlo Bruno Cody Dan Ezra Gus Luca Remy").split()
ANIMALS = "dog cat rabbit bird duck frog fox mouse turtle pony owl goat lamb hen puppy kitten".split()
PET_NAMES = ("Buddy Spot Fluffy Pip Coco Biscuit Pepper Sunny Muffin Bean Ziggy Oreo Pickles "
             "Nugget Waffles Tofu Bubbles Patch Button Sprout").split()
PLACES = ("park forest garden beach farm river lake hill meadow village market library school "
          "castle cave bakery zoo pond field orchard harbor island bridge mountain").split()
OBJECTS = ("ball kite box hat key boat book drum cup shell stone ribbon bell lamp map coin "
           "feather button star blanket wagon bucket whistle marble").split()
COLORS = "red blue green yellow purple orange pink white black brown silver golden".split()
ADJS = ("little big shiny soft old new tiny bright funny quiet happy brave kind clever gentle "
        "sleepy busy").split()
FOODS = "apples bread cookies soup cake berries cheese pie carrots honey rice pears".split()
WEATHER = ("sunny rainy windy snowy cloudy warm cold foggy").split()
FEELINGS = "happy sad scared excited tired proud surprised curious angry calm".split()
WORDS = ("moonbeam pinecone thunder marmalade lantern pebble snowflake rainbow acorn teapot "
         "whisper compass dandelion ember lighthouse pancake starfish velvet walnut zephyr").split()
CONTAINERS = "basket drawer chest bag box pocket cupboard nest".split()

OPENINGS = (
    "Once upon a time, there was a {adj} {kind} named {hero}.",
    "One {weather} day, a {adj} {kind} called {hero} woke up early.",
    "There once lived a {kind} named {hero} in a small house near the {home}.",
    "{hero} was a {adj} {kind} who lived by the {home}.",
)
SETUP = (
    "{Sub} had a pet {animal} named {pet}. {pet} liked to follow {obj} everywhere.",
    "{Pos} favorite thing was a {color} {thing}. {Sub} kept the {color} {thing} in a {box}.",
    "{hero} had a secret word. The secret word was {word}. Only {pet} knew it.",
    "{hero}'s best friend was {friend}. {friend} lived next to the {home}.",
)
MIDDLE = (
    "One day, {hero} and {friend} went to the {place}. The {place} was {adj2} and {weather}.",
    "At the {place}, {hero} saw a {adj2} {animal2}. The {animal2} looked {feeling}.",
    "{hero} said, \"{friend}, do you want to play with me?\" {friend} said, \"Yes, let's play!\"",
    "{pet} the {animal} ran to the {place} and {hero} ran after {pet}.",
    "They ate some {food} and drank some water. The {food} tasted very good.",
    "{hero} felt {feeling}. {Sub} did not know what to do.",
    "Then it started to get {weather}. {hero} and {pet} went back home.",
    "{friend} found a {adj2} {thing2} near the {place}. \"Look at this!\" said {friend}.",
    "{hero} looked for the {color} {thing} but could not find it. {Sub} looked under the bed and "
    "in the {box}.",
    "Mom said, \"{hero}, please be careful at the {place}.\" {hero} said, \"I will, Mom.\"",
    "{hero} and {friend} built a {adj2} house out of sticks and leaves.",
    "The {animal2} was hungry, so {hero} gave it some {food}. The {animal2} was {feeling} now.",
    "{hero} climbed up the hill and saw the whole {place} from the top.",
    "{friend} was {feeling} because {fsub} lost a {thing2}. {hero} helped {fobj} look for it.",
    "They walked along the {place} and counted {num} {animal2}s.",
    "{hero} told {friend} a story about a {adj2} {animal2} who lived in a {place}.",
)
CHAPTER = "Chapter {n}. The {adj2} {place}."
RECALLS = (
    "{hero} remembered the secret word. {Sub} whispered, \"{word}.\"",
    "{pet} the {animal} jumped and played, and {hero} laughed.",
    "{hero} held the {color} {thing} tight. It was still {pos} favorite thing.",
    "{hero} thought about {friend} and the day at the {home}.",
)
ENDINGS = (
    "At the end of the day, {hero} put the {color} {thing} back in the {box}. {Sub} was {feeling} "
    "and went to sleep.",
    "When {hero} got home, {pet} was waiting. {hero} hugged {pet} and said the secret word: "
    "{word}.",
    "{hero} and {friend} were best friends forever. The end.",
    "From that day on, {hero} always took {pet} to the {home}. The end.",
)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _story(rng: random.Random) -> str:
    girl = rng.random() < 0.5
    hero = rng.choice(GIRLS if girl else BOYS)
    fgirl = rng.random() < 0.5
    friend = rng.choice([n for n in (GIRLS if fgirl else BOYS) if n != hero])
    sub, obj, pos = ("she", "her", "her") if girl else ("he", "him", "his")
    state = dict(
        hero=hero, friend=friend, kind="girl" if girl else "boy", Sub=_cap(sub), obj=obj, pos=pos,
        Pos=_cap(pos), fsub="she" if fgirl else "he", fobj="her" if fgirl else "him",
        adj=rng.choice(ADJS), weather=rng.choice(WEATHER), home=rng.choice(PLACES),
        animal=rng.choice(ANIMALS), pet=rng.choice(PET_NAMES), color=rng.choice(COLORS),
        thing=rng.choice(OBJECTS), box=rng.choice(CONTAINERS), word=rng.choice(WORDS),
    )
    r = rng.random()
    n_par = rng.randint(2, 8) if r < 0.8 else rng.randint(12, 35) if r < 0.95 else rng.randint(60, 140)
    paras = [" ".join([rng.choice(OPENINGS)] + rng.sample(SETUP, rng.randint(2, 4))).format(**state)]
    for i in range(n_par):
        # Per-paragraph choices (place, second animal...) change through the story.
        for key, pool in (("place", PLACES), ("adj2", ADJS), ("animal2", ANIMALS), ("food", FOODS),
                          ("feeling", FEELINGS), ("thing2", OBJECTS)):
            state[key] = rng.choice(pool)
        state["num"] = str(rng.randint(2, 12))
        if n_par > 10 and i % 8 == 0:
            paras.append(CHAPTER.format(n=i // 8 + 1, **state))
        sentences = rng.sample(MIDDLE, rng.randint(2, 5))
        if i > 0 and rng.random() < 0.35:
            sentences.append(rng.choice(RECALLS))
        paras.append(" ".join(sentences).format(**state))
    paras.append(rng.choice(ENDINGS).format(**state))
    return "\n\n".join(paras)


def generate_split(split: str) -> list[str]:
    """The documents of one split, deterministic for (VERSION, split)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"demo-stories has splits {', '.join(SPLIT_SEEDS)}, not '{split}'")
    rng = random.Random(SPLIT_SEEDS[split])
    docs, size, target = [], 0, SPLIT_BYTES[split]
    while size < target:
        doc = _story(rng)
        docs.append(doc)
        size += len(doc) + 1
    return docs


def corpus_dir(cache_root: str | os.PathLike) -> Path:
    return Path(cache_root) / "corpus" / f"demo-stories-v{VERSION}"


def ensure_demo_corpus(dir: str | os.PathLike) -> dict[str, Path]:
    """Write `<dir>/{train,validation}.jsonl` once (atomically) and return their paths."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLIT_SEEDS:
        path = dir / f"{split}.jsonl"
        if not path.exists():
            lines = [json.dumps({"text": doc}) for doc in generate_split(split)]
            atomic_write_text(path, "\n".join(lines) + "\n")
        paths[split] = path
    return paths
