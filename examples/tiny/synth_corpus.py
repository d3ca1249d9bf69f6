#!/usr/bin/env python3
"""Synthesise a small English speech corpus with phone transcripts (espeak-ng + sox).

Writes, under ``OUT``::

    wav/{split}_{i:04d}.wav      16 kHz mono 16-bit speech
    {split}.tsv                  fairseq manifest (audio root, then ``name<TAB>num_samples``)
    {split}.phn                  one line per manifest row: espeak-ng phones, space-separated
    {split}.txt                  the sentence each utterance says (for reading, not used)
    corpus.json                  how it was made (seed, voices, sizes, seconds per split)
    {split}.align                with --align only: one line per manifest row, one phone per 10 ms
                                 frame (``dicehubert-labels quality``'s input; espeak_align.py)

Sentences come from a small seeded grammar over a few hundred everyday words; every utterance
gets its own voice (English accents x espeak-ng voice variants), speed (words per minute) and
pitch, drawn from the seed.  Phones are ``espeak-ng -q -x --sep=_`` in the utterance's own
accent, stress marks (``'`` and ``,``) removed.  Synthesis runs in ``--jobs`` processes; the
result depends on the seeds only (each utterance's randomness is drawn up front).

Two disjoint voice sets make two different corpora, so that a conclusion drawn on one can be
checked on the other:

* ``--voices default``: 4 accents (US, British, RP) x 26 voice variants;
* ``--voices other``: 4 other accents (New York, Scottish, Lancaster, Caribbean) x 26 other
  variants, no accent or variant shared with the default set.

``--text-seed`` draws the sentences from their own seed (by default the sentences and the
voices come from one stream seeded by ``--seed``); a different text seed gives other sentences
from the same grammar.

Examples::

    python examples/tiny/synth_corpus.py --out work/corpus --minutes 10 --seed 0
    python examples/tiny/synth_corpus.py --out work/other --minutes 10 --seed 0 --voices other --text-seed 1000
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

SAMPLE_RATE = 16000

# Accents and voice variants (espeak-ng --voices=en, --voices=variant). Variants change the
# voice (formants, pitch range, breathiness), accents change the phones too.
ACCENTS = ("en-us", "en-us", "en-gb", "en-gb-x-rp")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "Alicia", "Andy", "Annie", "david", "Mr serious",
            "steph", "anika", "edward", "max", "paul", "rob")
#: the second corpus's voices (--voices other): no accent or variant in common with the above
OTHER_ACCENTS = ("en-us-nyc", "en-gb-scotland", "en-gb-x-gbclan", "en-029")
OTHER_VARIANTS = ("m8", "klatt4", "klatt5", "adam", "Alex", "Andrea", "aunty", "benjamin", "caleb",
                  "edward2", "Gene", "Hugo", "iven", "iven2", "john", "linda", "Michael", "Mike",
                  "norbert", "quincy", "robert", "shelby", "steph2", "travis", "victor", "zac")
#: every English accent of espeak-ng (the mbrola ones aside): the tuning and teacher corpora speak
#: all of them, each with voice variants that neither evaluation corpus uses, so that an
#: (accent, variant) voice of theirs is never one of 'default' or 'other'
ALL_ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-us-nyc", "en-gb-scotland", "en-gb-x-gbclan", "en-029",
               "en-gb-x-gbcwmd")
#: the tuning corpus's variants (--voices tune): recipe values are chosen on its valid split
TUNE_VARIANTS = ("antonio", "belinda", "Denis", "Gene2", "iven3", "Lee", "michel", "steph3")
#: the pretrained teachers' corpus (--voices teacher): variants of neither evaluation corpus nor
#: the tuning corpus
TEACHER_VARIANTS = ("boris", "Diogo", "ed", "gustave", "Henrique", "iven4", "Jacky", "kaukovalta",
                    "marcelo", "Marco", "Mario", "miguel", "Nguyen", "pablo", "pedro", "RicishayMax",
                    "Storm", "AnxiousAndy", "grandpa", "grandma", "klatt6", "sandro", "announcer",
                    "Tweaky")
VOICE_SETS = {"default": (ACCENTS, VARIANTS), "other": (OTHER_ACCENTS, OTHER_VARIANTS),
              "tune": (ALL_ACCENTS, TUNE_VARIANTS), "teacher": (ALL_ACCENTS, TEACHER_VARIANTS)}
#: espeak-ng -x marks that are not phones once split at '_': pauses ('_:' gives ':'), and the
#: stand-alone modifiers '!' and ';'
NOT_PHONES = {":", "!", ";"}
SPEED = (130, 185)   # words per minute
PITCH = (25, 75)     # espeak-ng -p, 0..99

# ---------------------------------------------------------------------------------------------
# a tiny seeded grammar (several hundred words: plenty of English phones in every context)

DET = "the a this that every one my your his her our their some".split()
ADJ = ("big small old young red green blue yellow black white brown quiet loud happy sad quick slow "
       "warm cold bright dark heavy light soft hard clean dirty tall short long round sharp smooth "
       "rough sweet bitter fresh strange simple careful gentle brave clever lazy busy empty full "
       "narrow wide thick thin rich poor early late golden silver wooden broken hidden").split()
NOUN = ("dog cat horse bird fish farmer teacher doctor child woman man sailor baker pilot driver "
        "singer painter king queen soldier student boat car train plane bridge river mountain "
        "village city garden forest window door table chair house kitchen letter book paper pencil "
        "apple orange bread cheese water coffee milk basket bottle bucket hammer ladder engine "
        "clock lamp mirror pocket jacket shoe hat ring coin map road street island valley castle "
        "tower church market station office storm cloud wind rain snow fire stone sand shell "
        "feather rope wheel button candle blanket pillow carpet picture song story question answer "
        "morning evening winter summer").split()
VERB_T = ("found lost carried painted opened closed washed watched pushed pulled lifted dropped "
          "cleaned fixed built bought sold took gave held kept made broke caught threw chased "
          "followed touched counted hid moved covered filled emptied checked visited remembered "
          "forgot borrowed packed wrapped burned").split()
VERB_I = ("slept laughed smiled waited jumped danced sang cried shouted whispered rested worked "
          "arrived left returned stopped listened wondered walked ran swam climbed fell").split()
ADV = ("quickly slowly quietly loudly happily sadly carefully gently suddenly finally again "
       "today yesterday there here outside inside early late softly bravely").split()
PREP = "near behind under over beside inside across along through toward against above below".split()
NAME = ("John Mary Peter Susan Thomas Emma George Alice Henry Laura Oliver Grace Jack Ruth Daniel "
        "Helen Mark Julia Simon Anna").split()
NUM = "two three four five six seven eight nine ten eleven twelve twenty thirty forty hundred".split()
CONJ = "and but so because while when although".split()


def noun_phrase(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.15:
        return rng.choice(NAME)
    if r < 0.25:
        return f"{rng.choice(NUM)} {rng.choice(ADJ)} {rng.choice(NOUN)}s"
    adj = f"{rng.choice(ADJ)} " if rng.random() < 0.6 else ""
    return f"{rng.choice(DET)} {adj}{rng.choice(NOUN)}"


def clause(rng: random.Random) -> str:
    subj = noun_phrase(rng)
    if rng.random() < 0.6:
        out = f"{subj} {rng.choice(VERB_T)} {noun_phrase(rng)}"
    else:
        out = f"{subj} {rng.choice(VERB_I)}"
    if rng.random() < 0.5:
        out += f" {rng.choice(PREP)} {noun_phrase(rng)}"
    if rng.random() < 0.3:
        out += f" {rng.choice(ADV)}"
    return out


def sentence(rng: random.Random) -> str:
    s = clause(rng)
    if rng.random() < 0.35:
        s += f" {rng.choice(CONJ)} {clause(rng)}"
    return s[0].upper() + s[1:] + "."


# ---------------------------------------------------------------------------------------------
# synthesis


def phones(text: str, voice: str) -> List[str]:
    """espeak-ng's phones of ``text`` in ``voice``'s accent, stress marks removed."""
    out = subprocess.run(["espeak-ng", "-q", "-x", "--sep=_", "-v", voice, text],
                         check=True, capture_output=True, text=True).stdout
    result = []
    for word in out.split():
        for p in word.split("_"):
            p = p.replace("'", "").replace(",", "")  # primary / secondary stress
            if p and p not in NOT_PHONES:
                result.append(p)
    return result


def synthesise(job: Dict, wav_dir: str, align: bool = False) -> Tuple[str, int, List[str], Optional[List[str]]]:
    """Speak one utterance to ``wav_dir/{name}`` at 16 kHz mono 16-bit; return (name, samples, phones,
    frame phones at :data:`ALIGN_RATE` if ``align`` else None)."""
    path = os.path.join(wav_dir, job["name"])
    voice = f"{job['accent']}+{job['variant']}"
    with tempfile.NamedTemporaryFile(suffix=".wav", dir=wav_dir, delete=False) as tmp:
        raw = tmp.name
    try:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(job["speed"]), "-p", str(job["pitch"]),
                        "-w", raw, job["text"]], check=True, capture_output=True)
        part = path + ".part.wav"
        # sox: 16 kHz mono 16-bit, trimmed of leading/trailing silence (keeps 0.1 s)
        subprocess.run(["sox", raw, "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", part,
                        "silence", "1", "0.02", "0.1%", "reverse", "silence", "1", "0.02", "0.1%", "reverse",
                        "pad", "0.1", "0.1"], check=True, capture_output=True)
        os.replace(part, path)
        with wave.open(path) as w:
            if w.getframerate() != SAMPLE_RATE or w.getnchannels() != 1:
                raise RuntimeError(f"{path}: sox wrote {w.getframerate()} Hz, {w.getnchannels()} channels")
            n = w.getnframes()
        phs = phones(job["text"], job["accent"])
        frames = align_frames(job, voice, raw, n, phs) if align else None
    finally:
        if os.path.exists(raw):
            os.unlink(raw)
    return job["name"], n, phs, frames


#: frames per second of ``{split}.align``
ALIGN_RATE = 100


def align_frames(job: Dict, voice: str, raw: str, num_samples: int, transcript: List[str]) -> List[str]:
    """One phone per 1 / ALIGN_RATE s of the final audio, timed by espeak-ng's phoneme events in ``raw``.

    The final audio is ``raw`` trimmed of its leading silence by sox (measured here by running the
    same ``silence`` effect alone), resampled, and padded with 0.1 s; events that are no phone of
    the transcript (pauses, ``;``) are silence.  The phones met must be ``transcript``.
    """
    import numpy as np

    import espeak_align  # beside this script; needs libespeak-ng.so (installed with espeak-ng) and numpy

    events, rate = espeak_align.phone_events(job["text"], voice, job["speed"], job["pitch"], raw)
    lead_path = raw + ".lead.wav"
    try:
        subprocess.run(["sox", raw, lead_path, "silence", "1", "0.02", "0.1%"], check=True, capture_output=True)
        samples, _ = espeak_align.read_wav_int16(raw)
        rest, _ = espeak_align.read_wav_int16(lead_path)
    finally:
        if os.path.exists(lead_path):
            os.unlink(lead_path)
    lead = len(samples) - len(rest)
    if not np.array_equal(samples[lead:], rest):
        raise RuntimeError(f"{job['name']}: sox's leading trim is not a suffix of espeak-ng's audio")
    events = [(s, p if p not in NOT_PHONES else "_") for s, p in events]  # ';' and the like: not phones
    frames = espeak_align.frame_phones(events, rate, 0.1 - lead / rate, num_samples, SAMPLE_RATE, ALIGN_RATE)
    met = [p for s, p in events if not espeak_align.is_pause(p)]
    if met != transcript:
        raise RuntimeError(f"{job['name']}: espeak-ng's phoneme events {met} differ from its transcript {transcript}")
    return frames


def plan(seconds: Dict[str, float], seed: int, seconds_per_utt: float = 3.4, voices: str = "default",
         text_seed: Optional[int] = None) -> Dict[str, List[Dict]]:
    """Per split, the utterances to synthesise (text, voice, speed, pitch), drawn from the seeds.

    Args:
        seconds: audio per split, about (``{"train": 360.0, ...}``).
        seed: seed of the voices, speeds and pitches (and of the texts when ``text_seed`` is None).
        seconds_per_utt: expected length of an utterance, to turn seconds into utterances.
        voices: a key of :data:`VOICE_SETS`.
        text_seed: seed of the sentences; None: one stream for sentences and voices.

    Returns:
        per split, a list of ``{"name", "text", "accent", "variant", "speed", "pitch"}``.
    """
    accents, variants = VOICE_SETS[voices]
    rng = random.Random(seed)
    text_rng = rng if text_seed is None else random.Random(text_seed)
    jobs: Dict[str, List[Dict]] = {}
    for split, sec in seconds.items():
        n = max(1, round(sec / seconds_per_utt))
        jobs[split] = []
        for i in range(n):
            text = sentence(text_rng)
            jobs[split].append({
                "name": f"{split}_{i:04d}.wav",
                "text": text,
                "accent": rng.choice(accents),
                "variant": rng.choice(variants),
                "speed": rng.randint(*SPEED),
                "pitch": rng.randint(*PITCH),
            })
    return jobs


def write_text(path: str, lines: Sequence[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="corpus directory to write")
    p.add_argument("--minutes", type=float, default=10.0, help="total audio, about (default %(default)s)")
    p.add_argument("--split-fractions", default="0.55,0.12,0.33",
                   help="train,valid,test shares of the audio (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of voices, speeds, pitches (and texts, unless "
                                                       "--text-seed is given)")
    p.add_argument("--voices", choices=sorted(VOICE_SETS), default="default",
                   help="voice set: 'default' or 'other' (other accents and variants, none shared with "
                        "'default'; default %(default)s)")
    p.add_argument("--text-seed", type=int, default=None,
                   help="seed of the sentences alone (default: drawn from --seed's stream)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel synthesis processes")
    p.add_argument("--align", action="store_true",
                   help="also write {split}.align: frame-level phones (espeak-ng's phoneme events, 100 Hz)")
    args = p.parse_args(argv)

    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            print(f"synth_corpus: error: '{tool}' not found on PATH (apt-get install espeak-ng sox)", file=sys.stderr)
            return 1
    fractions = [float(x) for x in args.split_fractions.split(",")]
    if len(fractions) != 3 or min(fractions) <= 0:
        print("synth_corpus: error: --split-fractions needs three positive numbers", file=sys.stderr)
        return 1
    total = args.minutes * 60
    seconds = {s: total * f / sum(fractions) for s, f in zip(("train", "valid", "test"), fractions)}
    jobs = plan(seconds, args.seed, voices=args.voices, text_seed=args.text_seed)
    out = os.path.abspath(args.out)
    wav_dir = os.path.join(out, "wav")
    os.makedirs(wav_dir, exist_ok=True)
    t0 = time.time()
    flat = [j for split in jobs for j in jobs[split]]
    results = {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # the work is in subprocesses
        for k, (name, n, phs, frames) in enumerate(pool.map(lambda j: synthesise(j, wav_dir, args.align), flat),
                                                   start=1):
            results[name] = (n, phs, frames)
            if k % 50 == 0 or k == len(flat):
                print(f"  synthesised {k}/{len(flat)} utterances", flush=True)
    info = {"seed": args.seed, "text_seed": args.text_seed, "voice_set": args.voices, "sample_rate": SAMPLE_RATE,
            "splits": {}}
    if args.align:
        info["align_rate"] = ALIGN_RATE
    for split, js in jobs.items():
        rows = [f"{j['name']}\t{results[j['name']][0]}" for j in js]
        # .phn and .txt first, the manifest last: a complete manifest means a complete split
        write_text(os.path.join(out, f"{split}.phn"), [" ".join(results[j["name"]][1]) for j in js])
        write_text(os.path.join(out, f"{split}.txt"), [j["text"] for j in js])
        if args.align:
            write_text(os.path.join(out, f"{split}.align"), [" ".join(results[j["name"]][2]) for j in js])
        write_text(os.path.join(out, f"{split}.tsv"), [wav_dir] + rows)
        secs = sum(results[j["name"]][0] for j in js) / SAMPLE_RATE
        info["splits"][split] = {"utterances": len(js), "seconds": round(secs, 1)}
        print(f"  {split}: {len(js)} utterances, {secs / 60:.1f} min", flush=True)
    info["synthesis_seconds"] = round(time.time() - t0, 1)
    accents, variants = VOICE_SETS[args.voices]
    info["voices"] = {"accents": sorted(set(accents)), "variants": list(variants), "speed_wpm": SPEED,
                      "pitch": PITCH}
    with open(os.path.join(out, "corpus.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"  corpus written to {out} in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
