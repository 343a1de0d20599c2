"""merging_helpers: the code behind the model-merging book.

The modules follow the book's table of contents:

* ``setup``        – first cell of every chapter: device, seeds, Colab detection
* ``zoo``          – chapter 0: the offline model zoo (base, tasks, experts, cache)
* ``evaluation``   – chapter 0: accuracy, normalized accuracy, Task/Domain-Ratio, true-label probability
* ``deltas``       – chapter 1: delta parameters (task vectors) and their statistics
* ``partitions``   – chapter 1: parameter names → layer, role, linear type
* ``selection``, ``drop``, ``rescale``, ``consensus``, ``recipes`` – chapters 2–3: the merge engine
* ``streaming``    – merging checkpoints larger than memory
"""

__version__ = "0.1.0"
