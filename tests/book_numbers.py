"""The numbers the chapters' prose may type (tests/test_book.py, the typed-number scan).

A result is computed and glued, never typed. What the prose may still type is listed here,
per chapter, by the words before the number (as the scan reads them: glue roles, math, code
spans, links and "Eq. 11"-style references taken out), each with why it is not a result. A new
typed number fails the scan until it is glued or added here with its reason.
"""

SETTING = "a setting of the code the text describes (a grid, a count of draws, a bar, a level)"
SOURCE = "quoted from a source (a paper or the slides), beside our measured number"
FACT = "a fact of the model, the data, a formula or an arithmetic, not a measurement"
EXAMPLE = "part of a worked example on fixed, hand-made numbers"
LABEL = "names a row, an item, a section or a case"
RECORDED = ("a result of trials this page does not re-run, said so beside it "
            "(the recipe's record: zoo.HEAVY's comment)")

ALLOWED = {
    "00_model_zoo": {
        'at least 3': SETTING, 'encoder ( 6': FACT, 'hidden size 384': FACT, 'size 384, 22.7M': FACT,
        'whether * -220': EXAMPLE, 'bigger than -241': EXAMPLE, 'whether * -14': EXAMPLE, '*-14 times 3': EXAMPLE,
        '(at most 0.5 %': SETTING, 'λ = 1': FACT, '= 1/ 5': FACT,
    },
    "01_delta_parameters": {
        'dict of 22.7M': FACT, 'minimum, the 10 %': SETTING, '10 %, 20 %': SETTING, '%, … 90 %': SETTING,
        '). Above 16M': SETTING, 'sample of 4M': SETTING, 'for a 10 %': SETTING, 'exceed about 0.03': SOURCE,
        'pairwise: the 10 %': LABEL, '% and 90 %': LABEL, 'columns (and 20 %': LABEL, '% with 80 %': LABEL,
        'against the 90 %': LABEL, "against DPPA's 0.03": SOURCE, 'clipped at ±0.05': SETTING,
        '±0.05, not ±1': FACT, 'cosine of 1': FACT, 'differs from 1': FACT, 'steps below 1': FACT,
        'of the 250': SETTING, 'two segments, 11': SETTING, 'permute the 1536': FACT, 'cell marked 0': FACT,
        'each, is 1': FACT, 'same direction, 0': FACT, 'row of 384': FACT, 'of the 30,522': FACT,
    },
    "02_task_arithmetic_and_dare": {
        'encoder ( 22.7': FACT, 'it): in 22.7': FACT, 'λ = 0': LABEL, 'stay at 1': FACT, 'draws 200': SETTING,
        'over the 200': SETTING, 'rates ( 100': SETTING, '|---|---|---|---| | 0.9': SETTING, '| | 0.99': SETTING,
        '| | 0.999': SETTING, 'eventually: the 0.999': LABEL, 'how close 0.99': LABEL, '( , 384': FACT,
        '384 → 1536': FACT, 'logits of 128': SETTING, 'them (a 2 ×': SETTING, '2 × 2': SETTING, 'at = 0.9': SETTING,
        '= 0.9, 0.99': SETTING, '0.99 and 0.999': SETTING, 'so that 0.9': SETTING, 'that 0.9, 0.99': SETTING,
        'drop rates, 3': SETTING, 'mergekit ≥ 0.1.0': SOURCE, 'close to 1': FACT, 'at most 1K': FACT,
        'weights ( 384': FACT, 'embedding has 768': FACT, 'has 768); 1K': FACT, '768); 1K– 200K': FACT,
        'matrices ( 384 ×': FACT, '(384 × 384': FACT, 'embeddings; above 200K': FACT, 'matrices ( 1536 ×': FACT,
        '(1536 × 384': FACT, 'embeddings ( 30522 ×': FACT, '(30522 × 384': FACT, 'λ = 1': FACT,
        'choices; the 2 ×': SETTING, '(mergekit ≥ 0.1.0': SOURCE, 'for (seed 7': SETTING, 'expert index 0': SETTING,
        'p = 0.9': SETTING,
    },
    "03_ties": {
        'they stay 0': EXAMPLE, 'on a 6 ×': SETTING, '6 × 12': SETTING, 'to density 0.3': SETTING,
        'tasks: points, 95 %': SETTING, 'well below 0.05': SETTING, '= (news 1': SETTING, '1, sentiment 1': SETTING,
        '1, compare 0.4': SETTING, '0.4, sign 0.4': SETTING, '0.4, product 0.4': SETTING, '(weights below 1': FACT,
        'each, density 0.5': EXAMPLE, 'keeps its 4': EXAMPLE, 'of exactly 0': FACT, '(multiples of 0.1': SETTING,
        'use density 0.2': SETTING, 'edge (after 20': SETTING, 'at density 0.2': SETTING, '| density 1': SETTING,
        'with probability 0.2': SETTING, 'agreeing experts); 3': SETTING, '| density 0.1': SETTING,
        '0.1 / 0.5': SETTING, 'equal to 1': FACT, 'so density 1': EXAMPLE, 'weights ( 0.25': EXAMPLE,
        'weights (0.25, 1': EXAMPLE, '(0.25, 1, 1': EXAMPLE, 'sum elects +1': SETTING,
    },
    "04_apl": {
        '(a bootstrap, 2,000': SETTING, 'with the 95 %': SETTING, '( CPUs): 5 ×': FACT, '× ( 1': FACT, '(1 + 6': FACT, '6 + 384': FACT, 'ratios from 0.95': SETTING,
        'highlighted ratio, 0.995': SOURCE, 'smaller: $\\tanh(I/ 5': SETTING, '\\approx I/ 5': SETTING,
        'or a 12 ×': FACT, '12 × 32': FACT, 'of the 384': FACT, 'and from 0.95': SOURCE,
        '"especially reaching 99.5 %': SOURCE, 'also has 0.5': SOURCE, '0.5 and 0.95': SOURCE,
        'we keep 0.9': SETTING, 'by the 1': FACT, 'the 1/( 1': FACT, 'block keeps 1.5×': SETTING,
        'least important 0.5×': SETTING,
    },
    "04b_apl_merging": {
        'sum to 1': FACT, 'margins ( +0.21': SOURCE, '(+0.21 and +0.54': SOURCE, "the paper's 5": SOURCE,
        'paper averages 57': SOURCE, '"significantly" ( 75.57': SOURCE, '(75.57 vs 70.15': SOURCE,
        'both ( 70.63': SOURCE, '(70.63 vs 70.42': SOURCE, 'vs 70.42, 76.25': SOURCE, '76.25 vs 75.71': SOURCE,
        '(mask seed 0': SETTING, '( , 0.1': SETTING, '0.1 … 1.0': SETTING, 'grid is 0.5': SOURCE,
        'is 0.5, 0.6': SOURCE, '0.5, 0.6, 0.7': SOURCE, '0.6, 0.7, 0.8': SOURCE, '0.7, 0.8, 0.9': SOURCE,
        '0.8, 0.9, 0.95': SOURCE, '0.9, 0.95, 0.99': SOURCE, '0.95, 0.99, 0.995': SOURCE,
        'six values 0.0005': SOURCE, 'values 0.0005, 0.001': SOURCE, '0.0005, 0.001, 0.005': SOURCE,
        '0.001, 0.005, 0.01': SOURCE, '0.005, 0.01, 0.05': SOURCE, '0.01, 0.05, 0.1': SOURCE,
        'TIES: density 0.2': SETTING, 'Llama-2-7B experts): 48.21': SOURCE, 'for LM-Cocktail, 48.58': SOURCE,
        'with DARE, 48.88': SOURCE, 'true ("Is -2': EXAMPLE, '("Is -2/ 7': EXAMPLE, '-2/7 < 0.3': EXAMPLE,
        'split (seed 0': SETTING,
    },
    "05_gradient_importance": {
        'never below 0': FACT, 'would have 50 %': FACT, 'for a 7B': FACT, 'that is 27': FACT, 'on a 300M': SETTING,
        'under the 15': FACT, 'expert ( 391': FACT, "for Llama-2-7B's 32": FACT, 'layers and 4,096': FACT,
        'hidden dimensions, 1': FACT, '1 + 32': FACT, '32 + 4,096': FACT, '4,096 = 4,129': FACT,
        'Section [ 5.2': LABEL, 'normalised, and 5.2': LABEL, 'of the 6': FACT, '| | 1': FACT, 'most; = 20': SETTING,
        'states, all 6': SETTING, 'in [ 5.2': LABEL,
    },
    "05b_gradient_table4": {
        'again, then 4 ×': SETTING, '4 × 5 ×': SETTING, '5 × 5': SETTING, '* **Seeds.** 5': SETTING,
        'seeds ( 2': SETTING,
    },
    "06_dppa": {
        'merging ( 6.6': LABEL, '±2λ = ±0.16': FACT, 'rate of 1': FACT, 'just below 1': FACT, 'table of 6.5': LABEL,
        '(none below 0': FACT, 'uses Method 2': LABEL, 'bands ( 90 %': SETTING, "the paper's 10 %": SOURCE,
        'target of 0.1': SETTING, 'less than 90 %': SETTING, 'on of 5': FACT, 'and of 5': FACT,
        '*DPPA at 80': SOURCE, 'at 80– 90 %': SOURCE, 'others at 10 %': SOURCE, 'at most 2': SETTING,
        "method's at 0.1": SETTING, '(DPPA at 0.9': SETTING, 'other at 0.1': SETTING, 'DARE at 0.9': SETTING,
        'DPPA at 90 %': SOURCE, 'seed ( 95 %': SETTING, 'of (bands 0': LABEL, '0 and 1': LABEL,
        'one: below 1': FACT, 'learning rate 0.01': SETTING, "the paper's 10⁻³": SOURCE, 'DPPA about 20': SOURCE,
        ') drops 90 %': FACT, 'rest by 10': FACT, 'DPPA keeping 10': SOURCE, 'keeping 10– 20 %': SOURCE,
        'methods keeping 80': SOURCE, 'keeping 80– 90 %': SOURCE, '(pruning rates 0.1': SETTING,
        '0.1 and 0.9': SETTING, 'merge with 10': SETTING, 'the first 200': SETTING, 'encoder: at 10⁻³': SETTING,
        'does), at 6': SETTING, 'at 6· 10⁻⁴': SETTING, 'and at 4': SETTING, 'at 4· 10⁻⁴': SETTING,
        "DARE paper's 0.03": SOURCE, 'kept ≥ 98 %': RECORDED, 'with mean 0': FACT, 'entering on 64': SETTING,
        'measured over 8': SETTING, 'no value; 3': SOURCE, 'nested: band 0': LABEL, 'keeps at 90 %': SETTING,
        '%, band 1': LABEL, 'adds between 90 %': SETTING, 'factor by ±0.1': SETTING, 'cap at 4.0': SETTING,
        'readings**. **Method 1': LABEL, 'tunes band 0': LABEL, 'adds band 1': LABEL, 'it; **Method 2': LABEL,
        'with band 1': LABEL, 'at factor 1': SETTING, 'rate of 0.8': SETTING, 'rates { 0.1': SETTING,
        'rates {0.1, 0.5': SETTING, '{0.1, 0.5, 0.8': SETTING, '0.5, 0.8, 0.9': SETTING, '0.8, 0.9, 0.95': SETTING,
        '— by 10': FACT, 'rate of 90 %': FACT, 'go below 1': SETTING, 'keep at 0.9': SETTING,
        'entries: band 0': LABEL, 'rest (band 1': LABEL, 'and Method 2': LABEL, 'search ( ±0.1': SETTING,
        '(±0.1 from 1': SETTING, 'factors at 1': SETTING, 'DARE (seed 0': SETTING, 'DPPA at 0.8': SETTING,
        '0.8 and 0.9': SETTING, 'labels* ( 128': SETTING, 'validation among 0.4': SETTING,
        'among 0.4, 0.6': SETTING, '0.4, 0.6, 0.8': SETTING, '0.8 and 1.0': SETTING, 'discussed in 6.3': LABEL,
        'formula of 6.2': LABEL,
    },
    "07_rms_adaptive": {
        'size ( 384 ×': FACT, '(384 × 384': FACT, 'for attention, 1536 ×': FACT, '1536 × 384': FACT,
        '(λ = 0': LABEL, '— with 95 %': SETTING, '(interval above 0': FACT, 'the slides: +0.60': SOURCE,
        '+0.60 and +0.76': SOURCE, 'LoRA experts: −1.04': SOURCE, 'experts: −1.04, −0.38': SOURCE,
        '−0.38 and −0.46': SOURCE, 'the slides: +0.85': SOURCE, '+0.85 to +0.90': SOURCE,
        'group. The 95 %': SETTING, 'merges in 7.6': LABEL, 'slides report 260': SOURCE, 's against 281': SOURCE,
        's on 7B': SOURCE, 'uses its 10M': SETTING, 'values ( 8': SOURCE, 'values (8.499e-4, 1': SOURCE,
        '(8.499e-4, 1.243e-4, 1': SOURCE, 'CV of 113.4 %': SOURCE, 'of order 1': FACT, 'mean by 0.1': SETTING,
        ', section 7.10': LABEL, '| top 50 %': SETTING, 'deltas are ~7×': SOURCE, 'correlation of +0.85': SOURCE,
        '— from 3': SOURCE, '3 or 5': SOURCE, '≤ = 8': SETTING, 'in a 384 ×': FACT, '384 × 384': FACT,
        'path a 7B': FACT,
    },
    "08_side_by_side": {
        '(a of 0': FACT, '(τ = 5': SOURCE, 'keeps ( 1.0': FACT, 'with a 95 %': SETTING, 'where the 95 %': SETTING,
        'interval excludes 0': FACT, '( points, 95 %': SETTING, 'tasks; section 8.5': LABEL,
        'budgets of 8.2': LABEL, 'groups of 8.3': LABEL, 'test at 95 %': SETTING, 'a family-wise 5 %': SETTING,
        '*detectable ( 80 %': SETTING, 'found with 80 %': SETTING, 'Llama-2-7B or 13B': SOURCE, 'from a 22M': FACT,
        'rate of 0.9': SETTING, 'group at 0.9': SETTING, 'at scale 1': SETTING, 'block ( 1': FACT,
        'at the 5 %': SETTING, '(and section 8.3': LABEL, 'listed under 8.2': LABEL, 'blocks of 8.4': LABEL,
        'row of 8.2': LABEL, 'why: ** 7B': SOURCE, 'setting; a 7B': SOURCE, 'needs about 14': FACT,
        'but no 7B': FACT, 'fraction of 0.3': SETTING, 'one at 0.2': SETTING, 'only within ±0.5': SETTING,
    },
    "08b_language_model": {
        '**SmolLM2-135M-Instruct** ( 30': FACT, 'hidden size 576': FACT, 'as a 4': FACT, '(cut to 32': SETTING,
        'replaces the 30': FACT, 'interval above 0': FACT, 'holds, below 0': FACT, 'not, across 0': FACT,
        'inconclusive; "within ±1': SOURCE, 'come from 7B': SOURCE, 'experts are 135M': FACT,
        'Llama-2-7B experts: 48.21': SOURCE, 'for LM-Cocktail, 48.58': SOURCE, 'with DARE, 48.88': SOURCE,
        'split (seed 0': SETTING, "at 's 0.4": SETTING, 'still scans 0.4': SETTING, '0.4 whenever 0.7': SETTING,
        'peak at 0.4': SETTING, '("What is 0.4': EXAMPLE, '0.4 - 12.3': EXAMPLE, 'out (" -11.9': EXAMPLE,
    },
    "09_merging_at_scale": {
        'from ( 1': LABEL, 'and ( 2': LABEL, 'merged a 22M': FACT,
        'papers merge 7B': SOURCE, '7B and 13B': SOURCE, '13B checkpoints, 14': SOURCE,
        'checkpoints, 14– 26': SOURCE, 'mode (a 10M': FACT, '(base + 3': SETTING,
    },
}
