"""shardadam.schedules against keras.optimizers.schedules, step by step."""

from __future__ import annotations

import pytest
import torch

from shardadam import schedules
from tests.reference import SCHEDULES, make_schedule


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedule_values_match_keras(kind):
    import keras

    ours = make_schedule(schedules, kind)
    theirs = make_schedule(keras.optimizers.schedules, kind)
    for step in range(0, 120):
        value = ours(step)
        assert value.dtype == torch.float32 and value.dim() == 0
        expected = torch.as_tensor(theirs(step)).float()
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=0, msg=f"step {step}")


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedule_config_round_trips(kind):
    schedule = make_schedule(schedules, kind)
    rebuilt = type(schedule).from_config(schedule.get_config())
    assert rebuilt == schedule
    assert torch.equal(rebuilt(17), schedule(17))
