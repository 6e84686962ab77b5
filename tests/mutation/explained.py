"""Survivors of `make mutate` that the tests cannot tell from the original code, each with the reason.

A mutant is listed here only when no test could catch it: the change does not alter behaviour (an
equivalent mutant), or alters only what no caller can observe. Anything else gets a test instead.
Matched by file, function and the changed line(s) exactly as in mutmut's diff (`make mutate` prints them);
`before` and `after` None match every mutant of the function (only for a reason that holds for all of them).
One list per area, in the files beside this one.
"""

from tests.mutation.explained_batching import BATCHING
from tests.mutation.explained_detokenizer import DETOKENIZER
from tests.mutation.explained_quantization import QUANTIZATION
from tests.mutation.explained_sampler import SAMPLER
from tests.mutation.report import Explained

EXPLAINED: list[Explained] = [*BATCHING, *SAMPLER, *DETOKENIZER, *QUANTIZATION]
