"""run_calls, the worker side of the local upscaler's batched submissions
(smi.upscalers.local): each call's outcome is its own, in order, and every outcome
can travel back to the stage's process."""

from __future__ import annotations

import pickle

from smi.errors import PermanentError
from smi.upscalers.local import run_calls


def fail(message: str) -> None:
    raise PermanentError(message)


def unpicklable_failure() -> None:
    class Local(Exception):  # a class pickle cannot find by name
        pass
    raise Local("held a lock")


def test_outcomes_are_in_call_order_and_a_failure_stays_with_its_call():
    outcomes = run_calls([(divmod, (7, 2)), (fail, ("refused",)), (max, (3, 9))])
    assert [ok for ok, _ in outcomes] == [True, False, True]
    assert outcomes[0][1] == (3, 1) and outcomes[2][1] == 9
    assert isinstance(outcomes[1][1], PermanentError) and str(outcomes[1][1]) == "refused"


def test_an_exception_that_cannot_be_pickled_comes_back_as_a_permanent_error_naming_it():
    [(ok, error)] = run_calls([(unpicklable_failure, ())])
    assert not ok and isinstance(error, PermanentError) and str(error) == "Local: held a lock"
    assert str(pickle.loads(pickle.dumps(error))) == "Local: held a lock"  # it travels
