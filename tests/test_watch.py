"""The run's ETA: during SFT it prices the RL steps too (estimated), during RL from measured RL steps."""

import pytest

from mr1jax.trainer.watch import eta_text, rl_step_cost_ratio


def test_rl_step_cost_ratio_counts_token_passes():
    # S = 88, R = 128 rows: decode 24 + reference 88 + update 3 x 88 token passes per row, vs SFT 3 x 88 per prompt
    assert rl_step_cost_ratio(16, 8, 64, 24, kl=True, old_pass=False) == pytest.approx(128 * (24 + 4 * 88) / (3 * 16 * 88))
    no_kl = rl_step_cost_ratio(16, 8, 64, 24, kl=False, old_pass=False)
    with_old = rl_step_cost_ratio(16, 8, 64, 24, kl=True, old_pass=True)
    assert no_kl < rl_step_cost_ratio(16, 8, 64, 24, kl=True, old_pass=False) < with_old
    assert rl_step_cost_ratio(16, 16, 64, 24, kl=True, old_pass=False) == pytest.approx(
        2 * rl_step_cost_ratio(16, 8, 64, 24, kl=True, old_pass=False))          # twice the samples, twice the cost


def test_eta_prices_the_whole_run():
    times = [5.0, 1.0, 1.0, 1.0]                      # the first (compiling) step is left out
    during_sft = eta_text(100, 1100, 800, times, rl_ratio=10.0)
    assert during_sft.startswith("eta ~3700s") and "SFT 700s" in during_sft and "300 RL steps ~3000s" in during_sft
    assert eta_text(900, 1100, 800, [9.0, 2.0, 2.0]) == "eta 400s"                 # RL: its own measured steps
    assert eta_text(10, 100, 100, times) == "eta 90s"                               # SFT only: no RL to price
