"""The replicated objective state is written in one share per rank and read back whole, from shares or from
the single file of older checkpoints."""
import torch

from pretrain import checkpoint


def test_shares_of_a_nested_state_merge_back_to_it_for_any_world(tmp_path):
    state = {"teacher": {"encoder.w": torch.ones(2), "head.b": torch.zeros(3)}, "center": torch.arange(4.0),
             "empty": {}}
    for world in (1, 2, 3, 5):
        shares = [checkpoint.objective_share(state, rank, world) for rank in range(world)]
        assert sum(len(share) for share in shares) == 4 and all(len(share) <= 4 // world + 1 for share in shares)
        merged = checkpoint.merge_shares(shares)
        assert merged.keys() == state.keys() and merged["empty"] == {}
        assert torch.equal(merged["teacher"]["head.b"], state["teacher"]["head.b"])
        assert torch.equal(merged["center"], state["center"])
    for rank, share in enumerate(shares):
        torch.save(share, tmp_path / f"objective_state_rank{rank}.pt")
    assert torch.equal(checkpoint.load_objective_state(str(tmp_path))["teacher"]["encoder.w"], torch.ones(2))


def test_a_checkpoint_written_before_the_shares_still_loads(tmp_path):
    torch.save({"center": torch.ones(3)}, tmp_path / "objective_state.pt")
    assert torch.equal(checkpoint.load_objective_state(str(tmp_path))["center"], torch.ones(3))
