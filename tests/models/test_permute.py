import pytest
import torch
from tiny_models import tiny_model

from lighten.models.permute import permute_llama


@pytest.mark.parametrize("bias", [False, True])
def test_permutation_preserves_logits_and_changes_weights(bias):
    model = tiny_model("llama", intermediate_size=128, vocab_size=128, attention_bias=bias, mlp_bias=bias)
    config = model.config
    # Random norm gains and biases, so a wrong permutation of them would show.
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", ".bias")):
            p.data = torch.randn_like(p)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
        sd = model.state_dict()
        permuted = permute_llama(sd, config, seed=0)
        twin = type(model)(config).eval()
        twin.load_state_dict(permuted)
        after = twin(ids).logits

    assert twin.lm_head.weight.data_ptr() == twin.model.embed_tokens.weight.data_ptr()  # still tied
    assert (after - before).abs().max() <= 1e-5 * before.abs().max()
    for name, w in sd.items():
        if not name.endswith(("q_proj.bias", "k_proj.bias")):  # q/k rows stay (RoPE), so their biases do
            assert not torch.equal(w, permuted[name]), name
    v_proj = "model.layers.0.self_attn.v_proj.weight"
    assert torch.equal(sd[v_proj], model.state_dict()[v_proj])  # the input state dict is left alone
    assert torch.equal(permute_llama(sd, config, seed=0)["model.norm.weight"], permuted["model.norm.weight"])
