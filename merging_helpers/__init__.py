"""merging_helpers: the code behind the model-merging book.

The reference modules follow the book's table of contents (each line: module, the
chapter that introduces it, what it holds); a test checks this list against the
modules on disk and ``_toc.yml``:

* ``notebook``   – chapter 0: every chapter's first cell (device, seeds, Colab)
* ``optional``   – chapter 0: the optional packages, imported with the extra that installs them named
* ``tasks``      – chapter 0: the five offline tasks (and chapter 4's held-out one) and their splits
* ``metrics``    – chapter 0: the measurements methods need too (accuracy, P_t, finite gradients, pooling);
  imports nothing of the package
* ``zoo``        – chapter 0: the model zoo (base, experts, frozen-base heads, cache)
* ``evaluation`` – chapter 0: accuracy, Task/Domain-Ratio, the Scorer (loss, gradient, batched variants)
* ``deltas``     – chapter 1: delta parameters (task vectors) and their statistics
* ``partitions`` – chapter 1: parameter names → layer, role, linear type; rates at any granularity
* ``explorer``   – chapter 1: the delta explorer (tables, histograms, widget)
* ``rng``        – chapter 2: reproducible random words for DARE / DELLA masks
* ``selection``  – chapter 2: the k-th largest |Δ| without sorting
* ``drop``       – chapter 2: drop rules (magnitude, DARE, MagPrune, threshold)
* ``rescale``    – chapter 2: rescales after a drop
* ``sweeps``     – chapter 2: λ sweeps and pruning curves as tidy frames
* ``consensus``  – chapter 3: Σ w_t Δ_t, sign election, disjoint merge
* ``options``    – chapter 3: options objects (a function's knobs as one dataclass, unknown names refused)
* ``methods``    – chapter 3: merge methods as data (drop → rescale → combine records)
* ``config``     – chapter 3: one validated merge configuration
* ``recipes``    – chapter 3: the reference engine (merge_tensor, merge_state_dicts)
* ``tensor_source`` – chapter 3: where a planned method reads the model (state dicts, or folders on disk)
* ``ablations``  – chapter 3: TIES step by step, merged deltas, ablation grids
* ``paired``     – chapter 3: two merges on the same examples (paired bootstrap, McNemar)
* ``apl``        – chapter 4: APL — causal tracing of partitions, calibrated drop rates, weights
* ``apl_explorer`` – chapter 4: the APL explorer (drop-rate maps, prune and score, widget)
* ``taylor``     – chapter 5: APL's gradient importance and the Taylor terms that check it
* ``bench``      – chapter 5: the speed and memory measurements chapters 5, 7 and the appendix show, each
  in a child process of its own (``python -m merging_helpers.bench.merge_speed``, ``.apl_gradient_lean``)
* ``dppa``       – chapter 6: DPPA's dynamic pruning rates, OWL's layer rates, DPA's bands, amplification
  and factor searches
* ``adamerging`` – chapter 6: AdaMerging, merge coefficients learned by entropy minimisation
* ``lora``       – chapter 7: LoRA experts as deltas (peft adapters read without unpickling, ΔW = (α/r)·BA)
* ``rms_adaptive`` – chapter 7: RMS-adaptive drop rates, the dispersion switch, the min-rate rescale
* ``rms_explorer`` – chapter 7: the RMS-adaptive explorer (drop-rate maps, merge and score, widget)
* ``results``    – chapter 8: every chapter's glued numbers, kept on disk for chapter 8
* ``reader_edition`` – chapter 8: the chapters with their prose rendered from those numbers, for plain
  Jupyter and Colab (no glue roles, answers folded)
* ``lanes``      – chapter 8: work run a few items at a time, each after what it waits for (the chapters
  in ``make test`` and ``make book``)
* ``book_build`` – chapter 8: how ``make book`` runs the chapters that write those records (in lanes),
  then renders them
* ``verdicts``   – chapter 8: the papers' claims as data, and the rule that reads each verdict
* ``compare``    – chapter 8: every method on one protocol (equal budgets, λ tuned on validation, seeds, cost)
* ``llm``        – chapter 8 (8b, "Merging a language model"): SmolLM2-135M from its GGUF file, its tasks as
  chat prompts, scoring by the answer token, full and LoRA fine-tunes (the language-model tier)
* ``llm_evaluator`` – chapter 8 (8b): the language-model tier read as chapter 8's protocol and APL read a zoo
* ``llm_tail``   – chapter 8 (8b): APL's corrupted runs of the language model from the corrupted block on
* ``mergekit_yaml`` – chapter 8 (appendix "Merging at scale"): our merge configs as mergekit YAML, and back
* ``fast``       – chapter 8 (appendix "Merging at scale"): the fast tier, streaming merges of
  HF folders, the fused path and its compiled kernel; it imports the reference, never the other way round
* ``grading``    – the course assignments: checks that tell a student what was expected (not a traceback)

The modules fall into four wings (:data:`WINGS`; a test checks that every module is in one
and that imports only go down the list: the engine imports nothing of the rest, the seed
methods import the engine, the fast tier imports both, the book's infrastructure anything):

* **engine** – what merges: rates and partitions, drop → rescale → combine, the method
  registry and its config, the reference executor and the tensor sources its plans read;
* **methods** – the seed methods (APL and its gradient, DPPA, AdaMerging, LoRA deltas,
  RMS-adaptive), each a module of its own whose planned merge is a registry entry;
* **fast** – merging at scale: streaming folders, checkpoints, the compiled kernel, mergekit YAML;
* **book** – what runs the chapters: the zoo and its tasks, evaluation, records, comparisons,
  explorers, measurements and grading.

The wings stay flat modules rather than folders: every chapter imports them by these names
(``from merging_helpers import apl``), and the test above keeps the wings apart.
The 0.2 aliases ``merging_helpers.streaming`` / ``checkpoints`` are gone (CHANGELOG.md).
"""

__version__ = "0.3.7"

WINGS = {
    "engine": ("partitions", "rng", "selection", "drop", "rescale", "consensus", "methods", "config", "options",
               "recipes", "tensor_source", "deltas", "metrics", "optional"),
    "methods": ("apl", "taylor", "dppa", "adamerging", "lora", "rms_adaptive"),
    "fast": ("fast", "mergekit_yaml"),
    "book": ("notebook", "results", "verdicts", "reader_edition", "compare", "sweeps", "ablations", "explorer",
             "apl_explorer", "rms_explorer", "grading", "zoo", "tasks", "evaluation", "paired", "bench", "llm",
             "llm_evaluator", "llm_tail", "lanes", "book_build"),
}
