"""FedMask domain package: masked models, mask math, aggregation kernel, codec, datasets, simulator.

Nothing here imports a broker client; RabbitMQ and Redis live behind adapters elsewhere.
"""

import os

# Same seeds, same masks on every x86 machine: MKL picks its matrix kernels by CPU, and its AVX-512
# kernels round differently from its AVX2 ones, so a run on an AVX-512 server differed from the same
# run on a laptop (tests/unit/test_pinned_results.py caught it). AVX2 is MKL's conditional numerical
# reproducibility branch that every x86 board and server since 2013 runs; MKL reads this at its first
# call, which comes after this package is imported. An operator's own setting wins.
os.environ.setdefault("MKL_CBWR", "AVX2")
