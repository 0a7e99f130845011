"""Every seed stream of lofa, derived from (seed, purpose) by one function.

    from lofa import seeds
    seeds.stream(run_seed, "base.batch", step=step)       # renders and draws of base-training step `step`
    seeds.stream(run_seed, "quality.sample", index=i)     # noise of the i-th scored sample of notebook 03's check
    seeds.span(run_seed, "base.batch")                    # [lo, hi): every seed of the stream lies in it

A *purpose* is one use of random numbers: what a world renders for base training, the noise of scored samples, the
batches of a hypernetwork stage... `PURPOSES` lists them all, each with

- role: "train" (anything a model is fitted on), "eval" (anything scored or checked: sample noise, references,
  ground-truth renders, evaluator and encoder checks) or "setup" (a seed handed on to a component, which derives
  its own streams from it) or "derived" (the last step of a stream whose parent says the role: a pair seed of the
  condition encoder is training data under encoder.pairs and a check under encoder.check).
  tests/test_seeds.py checks that no train seed of a run equals an eval seed of it.
- parent: what the `seed` argument of `stream` is: the run seed (None), or the value of another purpose (the
  evaluators derive theirs from `stream(run_seed, "evaluators")`, which `Run.evaluators` hands to
  `train_evaluators`).
- reads: which of case / step / index the stream depends on; any other is refused.
- the range of seeds it may produce: an affine purpose gives base + scale * seed + (its argument, below `limit`),
  so one run's seeds lie in [base + scale * seed, base + scale * seed + limit); a hashed purpose mixes its parts
  with numpy's SeedSequence and may give any seed below 2 ** bits.

Several functions take the first seed of a block and use seed, seed + 1, ... themselves (`lofa.evaluate.eval_plan`,
`base_competence`, `evaluator_sanity_table`, the evaluators' ground-truth pool): that block is `index` 0, 1, ... of
the purpose that gives its first seed, and the purpose's limit says how long it may grow.

Every formula is the one the package shipped with: the pretrained bases, evaluators and zoos under data/pretrained/
record their seeds, and the published tables were made with these streams. Changing one means re-running the
pipeline; tests/test_seeds.py pins each against its original expression and lists the known collisions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lofa.errors import LofaError

ROLES = ("train", "eval", "setup", "derived")
ARGUMENTS = ("case", "step", "index")


@dataclass(frozen=True)
class Purpose:
    """One named seed stream (see the module docstring); `derive` computes it, `span` bounds it."""

    name: str
    role: str                        # "train" | "eval" | "setup" | "derived"
    doc: str                         # what the seeds seed, and where
    parent: str | None = None        # purpose whose value is this stream's `seed` (None: the run seed)
    # affine streams: base + scale * seed + the value of `arg` (0 <= value < limit)
    base: int = 0
    scale: int = 1
    arg: str | None = None           # "case" | "step" | "index" | None (the stream is one seed per parent seed)
    limit: int = 1                   # exclusive bound of `arg` (1 when arg is None)
    # hashed streams: numpy SeedSequence over `entropy` ("seed", "case", "step", "index" or an int constant)
    entropy: tuple = ()
    spawn_key: tuple = ()
    words: int = 1                   # 32-bit words generated; `word` picks one (bits=32)
    word: int = 0
    bits: int = 32                   # 32: one uint32 word; 63: the first uint64 word shifted right by one

    @property
    def hashed(self) -> bool:
        return bool(self.entropy)

    @property
    def reads(self) -> tuple[str, ...]:
        """The arguments the stream depends on, in ARGUMENTS order."""
        used = set(self.entropy) if self.hashed else {self.arg}
        return tuple(a for a in ARGUMENTS if a in used)

    def derive(self, seed: int, case: int = 0, step: int = 0, index: int = 0) -> int:
        """The seed of (seed, case, step, index); arguments the stream does not read are ignored here."""
        given = {"seed": seed, "case": case, "step": step, "index": index}
        if not self.hashed:
            return self.base + self.scale * seed + (given[self.arg] if self.arg else 0)
        parts = [given[p] if isinstance(p, str) else p for p in self.entropy]
        sequence = np.random.SeedSequence([int(p) for p in parts], spawn_key=self.spawn_key)
        if self.bits == 63:
            return int(sequence.generate_state(2, np.uint64)[0] >> np.uint64(1))
        return int(sequence.generate_state(self.words)[self.word])

    def span(self, seed: int) -> tuple[int, int]:
        """[lo, hi) holding every seed the stream gives for parent seed `seed` (arguments within their limits)."""
        if self.hashed:
            return 0, 2 ** self.bits
        lo = self.base + self.scale * seed
        return lo, lo + self.limit


def _registry(*purposes: Purpose) -> dict[str, Purpose]:
    """{name: purpose}, in the order given (the order `PURPOSES` lists them in)."""
    return {p.name: p for p in purposes}


_LORA = "one LoRA of case `case` (lofa.lora.train.CaseStream); seed: the zoo's seed"
_HYPER = "(lofa.hypernet.data, 63-bit)"

# Where the streams of run seed s lie. Training: s itself (inits, the encoder's case picks), s · 1,000,003 + step
# (base), s · 10^5 + step and twice that (condition-encoder pairs), 10^7 + 1,000 s + role and 9.1 · 10^11 + 10^6 s
# + chunk (evaluators, whose seed is s + 10,000), and hashed LoRA (32-bit) and hypernetwork (63-bit) seeds anywhere.
# Scored: 500,000 + s + i (competence), 100,000-wide blocks at 7-14 million + 100,000 · s (zoo check, comparisons),
# 10^6 + s and twice that (encoder check). The families meet for a few run seeds: tests/test_seeds.py lists where.
PURPOSES: dict[str, Purpose] = _registry(
    # ---------------------------------------------------------------- setup: seeds handed to a component
    Purpose("world", "setup", "make_world: the held-out split and the identities' attributes"),
    Purpose("lora", "setup", "the zoo's seed (build_zoo, train_lora): the lora.* streams derive from it"),
    Purpose("evaluators", "setup", "train_evaluators' seed (Run.evaluators): its own, apart from the run's",
            base=10_000),
    Purpose("hypernet", "setup", "Triplets and DiffusionLoss (Run.triplets, Run.hypernet)"),
    Purpose("hypernet.stage2", "setup", "Stage II's and Text-to-LoRA's batches and Text-to-LoRA's init (Run.hypernet, "
            "Run.text_to_lora); seed: run seed + Stage2TrainConfig.seed", base=1),
    # ---------------------------------------------------------------- training
    Purpose("base.init", "train", "parameter init of the base generator (train_base)"),
    Purpose("base.batch", "train", "world.sample renders, case picks, t and noise of base-training step `step`",
            scale=1_000_003, arg="step", limit=1_000_003),
    Purpose("evaluators.fit", "train", "parameter init and the batch / augmentation generator of evaluator role "
            "`index` (train_evaluators)", parent="evaluators", scale=1000, arg="index", limit=1000),
    Purpose("evaluators.pool", "train", "world.sample / world.condition seed of chunk `index` of the evaluators' "
            "ground-truth pool (EvalConfig.seed_range)", parent="evaluators", base=900_000_000, scale=1_000_000,
            arg="index", limit=1_000_000),
    Purpose("encoder.init", "train", "parameter init of the condition encoder (Run.condition_encoder)"),
    Purpose("encoder.batch", "train", "case picks of the condition encoder's steps (train_condition_encoder)"),
    Purpose("encoder.pairs", "train", "pairs seed of condition-encoder step `step`; world_pairs derives "
            "pairs.condition, pairs.render and pairs.frames from it", scale=10**5, arg="step", limit=10**5),
    Purpose("pairs.condition", "derived", "world.condition seed of one (condition, render) pair (world_pairs); "
            "seed: an encoder.pairs or encoder.check seed", scale=2),
    Purpose("pairs.render", "derived", "world.render seed of one (condition, render) pair (world_pairs)",
            base=1, scale=2),
    Purpose("pairs.frames", "derived", "frame picks of one (condition, render) pair (world_pairs)"),
    Purpose("lora.render", "train", f"renders of {_LORA}", parent="lora", entropy=("seed", "case"), words=4, word=0),
    Purpose("lora.prior", "train", f"prior-preservation renders of {_LORA}", parent="lora",
            entropy=("seed", "case"), words=4, word=1),
    Purpose("lora.stream", "train", f"batches, t and noise of {_LORA}", parent="lora", entropy=("seed", "case"),
            words=4, word=2),
    Purpose("lora.condition", "train", f"condition seed recorded in the zoo index for {_LORA}", parent="lora",
            entropy=("seed", "case"), words=4, word=3),
    Purpose("lora.init", "train", "the A shared by every LoRA of a zoo (LoraTrainConfig.shared_init)",
            parent="lora", entropy=("seed",), spawn_key=(1,)),
    Purpose("lora.replicate", "train", "replicate `index` of a LoRA (lofa.bench.lora_replicates): another draw of its "
            "batches (seed: its lora.stream) or renders (seed: its lora.render)", parent="lora.stream",
            entropy=("seed", "index")),
    Purpose("hypernet.init", "train", "parameter init of Stage I (Run.hypernet)"),
    # SeedSequence pads entropy with zeros, so hypernet.view `v`, hypernet.batch (step v, process 0) and
    # hypernet.clips (case v) of one seed are one seed: training streams all three, kept as shipped.
    Purpose("hypernet.view", "train", f"world.condition seed of train condition view `index` {_HYPER}",
            parent="hypernet", entropy=("seed", "index", 0), bits=63),
    Purpose("hypernet.batch", "train", f"cases, views and targets of step `step` on process `index` {_HYPER}; seed: "
            "run seed + TrainConfig.seed (Stage I) or hypernet.stage2", entropy=("seed", "step", "index"), bits=63),
    Purpose("hypernet.clips", "train", f"world.sample seed of the diffusion term's clips of case `case` {_HYPER}",
            parent="hypernet", entropy=("seed", "case"), bits=63),
    Purpose("hypernet.noise", "train", f"clip picks, t and noise of the diffusion term at step `step` {_HYPER}",
            parent="hypernet", entropy=("seed", "step", 1), bits=63),
    Purpose("text_to_lora.init", "train", "parameter init of the Text-to-LoRA baseline (train_text_to_lora)",
            parent="hypernet.stage2"),
    Purpose("diff_lora.train", "train", "case, condition view, t and noise picks of the DiffLoRA-style baseline's "
            "diffusion steps (Run.diff_lora)", parent="hypernet", entropy=("seed", 4_409), bits=63),
    Purpose("hypernet.targets", "train", "target matrices of step `step` (lofa.hypernet.train.sample_targets)",
            scale=1_000_003, arg="step", limit=1_000_003),
    # ---------------------------------------------------------------- evaluation
    Purpose("hypernet.eval_view", "eval", f"world.condition seed of the reserved eval condition view `index` "
            f"{_HYPER}", parent="hypernet", entropy=("seed", "index", 7_919), bits=63),
    Purpose("encoder.check", "eval", "pairs seed of the condition encoder's retrieval check on held-out cases",
            base=10**6),
    Purpose("competence", "eval", "seed + `index` of the base-competence check and the evaluator sanity table "
            "(notebook 02, lofa pretrain)", base=500_000, arg="index", limit=100_000),
    Purpose("quality.sample", "eval", "noise of scored sample `index` of the zoo's quality check (notebook 03, "
            "lofa bench sweep)", base=7_000_000, scale=100_000, arg="index", limit=100_000),
    Purpose("quality.ground_truth", "eval", "ground-truth renders of the zoo's quality check (index 1: the Fréchet "
            "reference set)", base=8_000_000, scale=100_000, arg="index", limit=100_000),
    Purpose("quality.reference", "eval", "style / face references of the zoo's quality check", base=9_000_000,
            scale=100_000, arg="index", limit=100_000),
    Purpose("quality.denoise", "eval", "denoising-loss renders (index 0) and noise (index 1) of the zoo's quality "
            "check", base=10_000_000, scale=100_000, arg="index", limit=100_000),
    Purpose("compare.sample", "eval", "noise of scored sample `index` of a comparison (lofa.evaluate.EvalSeeds, "
            "notebooks 06-08)", base=11_000_000, scale=100_000, arg="index", limit=100_000),
    Purpose("compare.reference", "eval", "style / face references of a comparison", base=12_000_000, scale=100_000,
            arg="index", limit=100_000),
    Purpose("compare.ground_truth", "eval", "ground-truth renders of a comparison", base=13_000_000, scale=100_000,
            arg="index", limit=100_000),
    Purpose("compare.denoise", "eval", "denoising-loss renders (index 0) and noise (index 1) of a comparison",
            base=14_000_000, scale=100_000, arg="index", limit=100_000),
)


def purpose(name: str) -> Purpose:
    """The registered purpose `name`; an unknown name is a one-line error listing the valid ones."""
    if name not in PURPOSES:
        raise LofaError(f"unknown seed purpose {name!r}; valid purposes: {', '.join(PURPOSES)}")
    return PURPOSES[name]


def stream(seed: int, name: str, *, case: int | None = None, step: int | None = None,
           index: int | None = None) -> int:
    """The seed of purpose `name` for `seed` (the run seed, or the parent purpose's value) at (case, step, index).

    Arguments the purpose does not read are refused, and so are negative ones or ones at or past an affine
    purpose's limit (beyond it the stream leaves its declared range); omitted ones count as 0.
    """
    p = purpose(name)
    given = {"case": case, "step": step, "index": index}
    extra = [a for a, v in given.items() if v is not None and a not in p.reads]
    if extra:
        reads = ", ".join(p.reads) or "nothing but the seed"
        raise LofaError(f"seed purpose {name!r} does not depend on {extra[0]}; it reads {reads}")
    values = {a: int(v or 0) for a, v in given.items()}
    if seed < 0 or min(values.values()) < 0:
        raise LofaError(f"seeds are non-negative; got seed={seed}, {values} for purpose {name!r}")
    if not p.hashed and p.arg is not None and values[p.arg] >= p.limit:
        raise LofaError(f"{p.arg} {values[p.arg]} of seed purpose {name!r} is past its limit {p.limit}")
    return p.derive(int(seed), **values)


def span(seed: int, name: str) -> tuple[int, int]:
    """[lo, hi) of every seed purpose `name` may give for `seed` (see `Purpose.span`)."""
    return purpose(name).span(seed)
