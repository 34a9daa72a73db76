"""patchflannel: Patched FLANNEL for chest X-ray diagnosis research.

Stages, in the order data flows: ``io`` → ``store`` → ``segment`` →
``sampler`` → ``learners`` → ``vote`` → ``ensemble`` → ``metrics``.
"""

__version__ = "0.1.0"
