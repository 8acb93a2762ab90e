"""Layer names the references record, importable without PyTorch (components declare them at class level)."""


def _block_layers() -> dict[str, str]:
    layers = {"norm1": "norm1"}
    for attn in ("attn1", "attn2"):
        layers.update({f"{attn}.to_q": f"{attn}/q", f"{attn}.to_k": f"{attn}/k", f"{attn}.to_v": f"{attn}/v",
                       f"{attn}.norm_q": f"{attn}/q_norm", f"{attn}.norm_k": f"{attn}/k_norm", attn: f"{attn}/out"})
    layers.update({"norm2": "norm2", "norm3": "norm3", "ffn.net.0": "ffn/hidden", "ffn": "ffn/out"})
    return layers


#: Submodules of a diffusers transformer block whose outputs the reference records, and their layer names.
BLOCK_LAYERS = _block_layers()
