"""How good is the post-check at catching what an LLM gets wrong? Precision and recall per claim type.

    python bench/postcheck.py [--molecules 300] [--seed 0] [--json out.json]
    python bench/postcheck.py --llm [--llm-molecules 500] [--model smollm2]   # (b): a real LLM's hallucinations

A corpus of true and false sentences about real molecules (the bundled BBBP set, standardised as the dsm stage
does), built from RDKit truth: for every claim type several phrasings, each stated once truly and once with a
controlled perturbation (a count off by one or two, an element added to the formula, a functional group the
molecule lacks, a class it is not, the wrong charge, a property value moved by more than its rounding). Each
sentence goes through ``postcheck.check`` exactly as the describe stage calls it.

Per type: recall = false sentences flagged wrong / false sentences; precision = flagged sentences that are
false / flagged sentences (a true sentence flagged is a false alarm); "missed" = false sentences whose claim
was not extracted or was called undecidable. Targets: precision >= 0.98, recall >= 0.90 for every type.
This is a measurement, not a timing: it runs in seconds.

``--llm`` (b): the hallucination rate of a real LLM (default SmolLM2-135M-Instruct, the model the project ships,
on the vllm backend, CPU unless ``--gpu``) describing BBBP molecules with the ``paper`` and the ``lardo`` prompt
sets, each with and without the DSM values in the prompt (``describe.variant`` full / no_dsm), default sampling;
every description through the same post-check, rates per claim type as the LLM wrote them. That is the
paper's own claim — DSM values in the prompt lower hallucination — measured.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
ELEMENT_NAMES = {"N": "nitrogen", "O": "oxygen", "S": "sulfur", "Cl": "chlorine", "F": "fluorine",
                 "Br": "bromine", "P": "phosphorus"}


def molecules(n: int, seed: int) -> list[str]:
    import csv

    from lardo_ray.chem.standardise import Standardiser

    st = Standardiser()
    out = []
    with open(ROOT / "lardo_ray" / "data" / "bbbp.csv", newline="") as f:
        for rec in csv.DictReader(f):
            r = st(rec["smiles"])
            if r.canonical:
                out.append(r.canonical)
    random.Random(seed).shuffle(out)
    return out[:n]


def _count(n: int, singular: str, plural: str, words: bool) -> str:
    num = NUMBER_WORDS[n] if words and n < len(NUMBER_WORDS) else str(n)
    return f"{num} {singular if n == 1 else plural}"


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _formula(elements: dict[str, int]) -> str:
    order = ["C", "H"] + sorted(e for e in elements if e not in ("C", "H"))
    return "".join(f"{e}{elements[e] if elements[e] > 1 else ''}" for e in order if elements.get(e))


def sentences(smiles: str, values: dict[str, float], rng: random.Random) -> list[tuple[str, str, bool]]:
    """(claim type, sentence, is the sentence true) for one molecule."""
    from lardo_ray.llm.claims import CLASSES, GROUPS, facts

    f = facts(smiles)
    out: list[tuple[str, str, bool]] = []

    def off(n: int) -> int:  # a wrong count, never negative
        return n + rng.choice([1, 2]) if n == 0 or rng.random() < 0.5 else n - 1

    # formula
    for tpl in ("Its molecular formula is {}.", "The compound ({}) is a small molecule.", "With the formula {}, it is "
                "moderately lipophilic."):
        truth = {k: v for k, v in f.elements.items() if v}
        out.append(("formula", tpl.format(_formula(truth)), True))
        wrong = dict(truth)
        e = rng.choice(["C", "N", "O", "Cl"])
        wrong[e] = max(0, wrong.get(e, 0) + rng.choice([1, 2, -1]))
        wrong = {k: v for k, v in wrong.items() if v}
        if wrong == truth:
            wrong["C"] += 1
        out.append(("formula", tpl.format(_formula(wrong)), False))
    # element counts
    for sym, name in ELEMENT_NAMES.items():
        n = f.elements.get(sym, 0)
        words = rng.random() < 0.5
        for tpl in ("It contains {}.", "There are {} in the molecule.", "{} are present."):
            for stated, truth in ((n, True), (off(n), False)):
                phrase = f"no {name}" if stated == 0 and tpl.startswith("It contains") else \
                    _count(stated, f"{name} atom", f"{name} atoms", words)
                if stated == 0 and not tpl.startswith("It contains"):
                    continue
                if tpl.startswith("{}"):
                    if stated == 1:
                        continue
                    phrase = phrase[0].upper() + phrase[1:]
                out.append(("element_count", tpl.format(phrase), truth))
    # structural counts (numeric-form claims, truth from RDKit)
    counts = [("ring_count", f.rings, "ring", "rings"), ("aromatic_rings", f.aromatic_rings, "aromatic ring",
              "aromatic rings"), ("hbd", f.hbd, "hydrogen bond donor", "hydrogen bond donors"),
              ("hba", f.hba, "hydrogen bond acceptor", "hydrogen bond acceptors"),
              ("rotatable_bonds", f.rotatable_bonds, "rotatable bond", "rotatable bonds"),
              ("stereocentres", f.stereocentres, "stereocentre", "stereocentres"),
              ("heavy_atoms", f.heavy_atoms, "heavy atom", "heavy atoms")]
    for kind, n, sing, plur in counts:
        for tpl in ("The molecule has {}.", "It contains {} in total."):
            for stated, truth in ((n, True), (off(n), False)):
                out.append((kind, tpl.format(_count(stated, sing, plur, kind != "heavy_atoms" and rng.random() < 0.4)),
                            truth))
    # formal charge
    q = f.formal_charge
    out += [("formal_charge", f"It has a net charge of {q}.", True),
            ("formal_charge", f"It has a net charge of {q + rng.choice([1, -1, 2])}.", False),
            ("formal_charge", "The molecule is neutral." if q == 0 else "The molecule is positively charged."
             if q > 0 else "The molecule is negatively charged.", True),
            ("formal_charge", "The molecule is positively charged." if q <= 0 else "The molecule is neutral.", False)]
    # functional groups: present ones stated, absent ones stated (false) and denied (true)
    present = [g for g, c in f.groups.items() if c]
    absent = [g for g, c in f.groups.items() if not c]
    for g in rng.sample(present, min(3, len(present))):
        name = rng.choice(GROUPS[g][0][:2])
        out.append(("functional_group", f"It contains {_a(name)} {name} group.", True))
        out.append(("functional_group", f"The structure has no {name} groups.", False))
        out.append(("functional_group", f"{_a(name).capitalize()} {name} group is present.", True))
        out.append(("functional_group", f"It features {_count(f.groups[g] + 1, name + ' group', name + ' groups', True)}"
                                        ".", False))
    for g in rng.sample(absent, min(3, len(absent))):
        name = GROUPS[g][0][0]
        out.append(("functional_group", f"It bears {_a(name)} {name} group.", False))
        out.append(("functional_group", f"It lacks {_a(name)} {name} group.", True))
        out.append(("functional_group", f"{_a(name).capitalize()} {name} moiety is present in the structure.", False))
    # compound classes a substructure decides
    for c in rng.sample(sorted(f.classes), 4):
        name = CLASSES[c][0]
        art = "an" if name[0] in "aeiou" else "a"
        out.append(("compound_class", f"It is {art} {name}.", bool(f.classes[c])))
        out.append(("compound_class", f"It is not {art} {name}.", not f.classes[c]))
    # DSM property values
    for desc, tpl, dec, delta in (("MolLogP", "Its logP is {}.", 2, 1.3), ("MolWt", "It has a molecular weight of {} "
                                  "g/mol.", 1, 25.0), ("TPSA", "Its TPSA is {} Å².", 1, 15.0)):
        v = values[desc]
        out.append(("numeric", tpl.format(f"{v:.{dec}f}"), True))
        out.append(("numeric", tpl.format(f"{v + rng.choice([-1, 1]) * delta:.{dec}f}"), False))
    return out


def llm_hallucination(n: int, model: str, gpu: bool, seed: int, max_tokens: int) -> list[dict]:
    """(b): per (prompt set, DSM values in the prompt): claims checked / wrong / undecidable per claim type."""
    import pyarrow as pa
    from rdkit import Chem

    from lardo_ray.chem.descriptors import DescriptorCalculator
    from lardo_ray.chem.standardise import mol_id_of
    from lardo_ray.llm.backends.vllm import VLLMBackend
    from lardo_ray.llm.cards import load_card
    from lardo_ray.llm.describe import DescribeStage2
    from lardo_ray.llm.settings import DescribeConfig
    from lardo_ray.llm.stage1 import default_template

    smiles = molecules(n, seed)
    calc = DescriptorCalculator("all")
    vals, _ = calc.compute([Chem.MolFromSmiles(x) for x in smiles])
    cols = {"mol_id": [mol_id_of(x) for x in smiles], "smiles": smiles}
    cols.update({d: [float(v) for v in vals[:, j]] for j, d in enumerate(calc.names)})
    table = pa.table(cols)
    base = DescribeConfig(backend="vllm", model=model, task="bbbp", postcheck="flag",
                          sampling={"max_tokens_stage2": max_tokens},
                          vllm={"gpu": gpu, "max_model_len": 2048})
    engine = VLLMBackend.from_config(base)
    rows = []
    try:
        for prompt_set in ("paper", "lardo"):
            for variant in ("full", "no_dsm"):
                cfg = base.model_copy(update={"prompt_set": prompt_set, "variant": variant})
                stage = DescribeStage2(cfg, default_template(load_card("bbbp"), prompt_set), backend=engine)
                t0 = time.perf_counter()
                out = stage(table).to_pylist()
                kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
                for r in out:
                    for k, (c, w, u) in json.loads(r["claims_by_kind"] or "{}").items():
                        kinds[k][0] += c
                        kinds[k][1] += w
                        kinds[k][2] += u
                n_claims = sum(v[0] for v in kinds.values())
                n_wrong = sum(v[1] for v in kinds.values())
                rows.append({"prompt_set": prompt_set, "dsm_values": variant == "full", "molecules": len(out),
                             "failed": sum(r["error"] is not None for r in out), "claims": n_claims,
                             "wrong": n_wrong, "rate": n_wrong / n_claims if n_claims else float("nan"),
                             "tokens": sum(r["completion_tokens"] or 0 for r in out),
                             "seconds": round(time.perf_counter() - t0, 1), "by_type": dict(kinds)})
                print(f"  {prompt_set:<6s} DSM values {'yes' if variant == 'full' else 'no ':<3s}: "
                      f"{n_wrong}/{n_claims} wrong ({rows[-1]['rate']:.1%}), {rows[-1]['tokens']:,} tokens in "
                      f"{rows[-1]['seconds']:.0f} s; " + ", ".join(f"{k} {w}/{c}" for k, (c, w, _u) in
                                                                     sorted(kinds.items(), key=lambda kv: -kv[1][0])),
                      flush=True)
    finally:
        engine.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--molecules", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the per-type figures here")
    ap.add_argument("--show-errors", type=int, default=0, help="print this many misjudged sentences per type")
    ap.add_argument("--llm", action="store_true", help="(b): measure a real LLM's hallucinations instead")
    ap.add_argument("--llm-molecules", type=int, default=500)
    ap.add_argument("--model", default="smollm2", help="describe.model for --llm (vllm backend)")
    ap.add_argument("--gpu", action="store_true", help="--llm on a GPU (default: vLLM on the CPU)")
    ap.add_argument("--max-tokens", type=int, default=200, help="max tokens per description (--llm)")
    args = ap.parse_args(argv)
    if args.llm:
        print(f"{args.model} on vLLM ({'GPU' if args.gpu else 'CPU'}), {args.llm_molecules} BBBP molecules, "
              "default sampling, the post-check per claim type as the LLM wrote it:")
        rows = llm_hallucination(args.llm_molecules, args.model, args.gpu, args.seed, args.max_tokens)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0

    from rdkit import Chem

    from lardo_ray.chem.descriptors import DescriptorCalculator
    from lardo_ray.llm.postcheck import check

    smiles = molecules(args.molecules, args.seed)
    calc = DescriptorCalculator(["MolLogP", "MolWt", "TPSA"])
    vals, _ = calc.compute([Chem.MolFromSmiles(s) for s in smiles])
    rng = random.Random(args.seed)
    stats: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    errors: dict[str, list[str]] = defaultdict(list)
    n_sent = 0
    for s, v in zip(smiles, vals):
        values = dict(zip(calc.names, map(float, v)))
        for kind, text, truth in sentences(s, values, rng):
            n_sent += 1
            res = check(text, values, smiles=s)
            typed = [d.ok for d in res.details if d.kind == kind] + [c.ok for c in res.structural if c.kind == kind]
            flagged = any(ok is False for ok in typed)
            st = stats[kind]
            st["true" if truth else "false"] += 1
            st["extracted"] += bool(typed)
            if flagged:
                st["flagged"] += 1
                st["flagged_false"] += not truth
            if not truth and not flagged:
                st["missed"] += 1
            if (flagged == truth) and len(errors[kind]) < args.show_errors:
                errors[kind].append(f"{'FALSE ALARM' if truth else 'MISSED'}: {text}  [{s}] {typed}")
    rows = []
    print(f"post-check on {n_sent:,} generated sentences about {len(smiles)} BBBP molecules "
          f"(true and perturbed, per claim type)")
    print(f"{'claim type':<18s} {'true':>6s} {'false':>6s} {'extracted':>9s} {'precision':>9s} {'recall':>7s}  target")
    ok_all = True
    for kind in sorted(stats, key=lambda k: -stats[k]["true"]):
        st = stats[kind]
        n = st["true"] + st["false"]
        precision = st["flagged_false"] / st["flagged"] if st["flagged"] else float("nan")
        recall = st["flagged_false"] / st["false"] if st["false"] else float("nan")
        meets = precision >= 0.98 and recall >= 0.90
        ok_all &= meets
        rows.append({"kind": kind, "n_true": st["true"], "n_false": st["false"], "extracted": st["extracted"] / n,
                     "precision": precision, "recall": recall, "meets_target": meets})
        print(f"{kind:<18s} {st['true']:>6d} {st['false']:>6d} {st['extracted'] / n:>9.1%} {precision:>9.3f} "
              f"{recall:>7.3f}  {'ok' if meets else 'BELOW'}")
        for e in errors[kind]:
            print("    " + e)
    if args.json:
        Path(args.json).write_text(json.dumps({"n_sentences": n_sent, "n_molecules": len(smiles), "types": rows},
                                              indent=1))
    print("all types meet precision >= 0.98 and recall >= 0.90" if ok_all else "some types are below the target")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
