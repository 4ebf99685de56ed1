"""Write the SAE files under tests/data/ with the real libraries, and each library's own ``encode`` outputs.

Run in a separate venv (never the project's), CPU torch only::

    python3 -m venv /work/venv-sae && . /work/venv-sae/bin/activate
    pip install torch==2.13.0
    echo torch==2.13.0 > c.txt && pip install -c c.txt sae-lens==6.54.12 eai-sparsify==1.3.3 dictionary-learning==0.1.0
    pip uninstall -y torchvision   # the PyPI wheel does not match the CPU torch, and nothing here needs it
    python tests/data/make_sae_files.py

Every SAE has d_in 16 and d_sae 32. Each library folder gets a ``reference.safetensors``: ``x`` (8, 16),
a fixed random input, and ``acts_<variant>``, what that library's own ``encode(x)`` returned; the tests
compare the atlas encoder against those numbers without the libraries installed.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).parent
D, N = 16, 32


def fixed_input() -> torch.Tensor:
    return torch.randn(8, D, generator=torch.Generator().manual_seed(1234)) * 2.0


def saelens() -> None:
    """sae-lens: StandardSAE (b_dec off the input, or not), JumpReLUSAE with thresholds of both signs, TopKSAE
    with and without ``rescale_acts_by_decoder_norm``; written by ``SAE.save_model`` (cfg.json +
    sae_weights.safetensors), reference = ``SAE.encode(x)``."""
    import sae_lens
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    meta = {"model_name": "EleutherAI/pythia-70m-deduped", "hook_name": "blocks.3.hook_resid_post"}
    saes = {
        "standard": StandardSAE(StandardSAEConfig(d_in=D, d_sae=N)),
        "standard_no_b_dec": StandardSAE(StandardSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=False)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=N)),
        "topk": TopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=5, rescale_acts_by_decoder_norm=False)),
        "topk_rescaled": TopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=5, rescale_acts_by_decoder_norm=True)),
    }
    root = OUT / "saelens"
    shutil.rmtree(root, ignore_errors=True)
    x = fixed_input()
    ref = {"x": x}
    g = torch.Generator().manual_seed(0)
    for name, sae in saes.items():
        for k, v in meta.items():
            sae.cfg.metadata[k] = v
        with torch.no_grad():
            sae.W_enc.copy_(torch.randn(D, N, generator=g) * 0.5)
            sae.b_enc.copy_(torch.randn(N, generator=g) * 0.5)
            sae.b_dec.copy_(torch.randn(D, generator=g) * 0.3)
            norms = torch.rand(N, 1, generator=g) * 2.9 + 0.1  # decoder rows of norm 0.1 .. 3
            w = torch.randn(N, D, generator=g)
            sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True) * norms)
            if name == "jumprelu":  # thresholds of both signs: SAELens gates relu(pre) on pre > threshold
                sae.threshold.copy_(torch.randn(N, generator=g) * 0.8)
            ref[f"acts_{name}"] = sae.encode(x).detach()
        sae.save_model(root / name)
    save_file({k: v.contiguous() for k, v in ref.items()}, str(root / "reference.safetensors"))
    print("sae-lens", sae_lens.__version__, "->", root)


def sparsify() -> None:
    """eai-sparsify: ``SparseCoder(16, SparseCoderConfig(num_latents=32, k=4)).save_to_disk(...)``; reference =
    ``SparseCoder.encode(x)`` (top_acts scattered at top_indices)."""
    import sparsify as sp

    torch.manual_seed(0)
    root = OUT / "eai-sparsify"
    shutil.rmtree(root, ignore_errors=True)
    sae = sp.SparseCoder(D, sp.SparseCoderConfig(num_latents=N, k=4))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.encoder.bias.normal_(0, 0.1)
    sae.save_to_disk(root / "layers.3")
    x = fixed_input()
    with torch.no_grad():
        out = sae.encode(x)
        acts = torch.zeros(x.shape[0], N).scatter_(-1, out.top_indices, out.top_acts)
    save_file({"x": x, "acts": acts}, str(root / "reference.safetensors"))
    print("eai-sparsify ->", root)


def dictionary_learning() -> None:
    """dictionary-learning: five trainers trained a few steps by ``trainSAE`` on random data (ae.pt + the
    trainer's config.json, as trainSAE writes them); reference = the class's ``from_pretrained(ae.pt).encode(x)``
    (AutoEncoder.from_pretrained normalises the decoder, which matters for StandardTrainerAprilUpdate)."""
    from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.standard import StandardTrainer, StandardTrainerAprilUpdate
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
    from dictionary_learning.training import trainSAE

    common = dict(activation_dim=D, dict_size=N, layer=3, lm_name="EleutherAI/pythia-70m-deduped",
                  submodule_name="resid_post_layer_3", device="cpu", steps=40, seed=0, warmup_steps=2)
    variants = {
        "relu": (dict(trainer=StandardTrainer, lr=1e-2, sparsity_warmup_steps=2, **common), AutoEncoder),
        "april": (dict(trainer=StandardTrainerAprilUpdate, lr=1e-2, sparsity_warmup_steps=2, **common), AutoEncoder),
        "topk": (dict(trainer=TopKTrainer, k=4, threshold_start_step=5, **common), AutoEncoderTopK),
        "batchtopk": (dict(trainer=BatchTopKTrainer, k=4, threshold_start_step=5, **common), BatchTopKSAE),
        "jumprelu": (dict(trainer=JumpReluTrainer, lr=1e-2, sparsity_warmup_steps=2, **common), JumpReluAutoEncoder),
    }
    root = OUT / "dictionary_learning" / "resid_post_layer_3"
    shutil.rmtree(root, ignore_errors=True)
    g = torch.Generator().manual_seed(7)
    data = [torch.randn(64, D, generator=g) * 2.0 for _ in range(40)]
    x = fixed_input()
    ref = {"x": x}
    for name, (cfg, cls) in variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            trainSAE(iter(data), [cfg], steps=40, save_dir=tmp, device="cpu")
            shutil.copytree(Path(tmp) / "trainer_0", root / name)
        ae = cls.from_pretrained(str(root / name / "ae.pt"))
        with torch.no_grad():
            ref[f"acts_{name}"] = ae.encode(x).detach()
        if name == "april":  # the raw state dict's decoder norms (AutoEncoder(...).load_state_dict, no normalising)
            sd = torch.load(root / name / "ae.pt", weights_only=True)
            raw = AutoEncoder(D, N)
            raw.load_state_dict(sd)
            with torch.no_grad():
                ref["acts_april_raw"] = raw.encode(x).detach()
            ref["april_decoder_norms"] = sd["decoder.weight"].norm(dim=0)
    save_file({k: v.contiguous() for k, v in ref.items()}, str(root.parent / "reference.safetensors"))
    print("dictionary-learning ->", root)


def main() -> None:
    torch.manual_seed(0)
    which = sys.argv[1:] or ["saelens", "sparsify", "dictionary_learning"]
    for name in which:
        {"saelens": saelens, "sparsify": sparsify, "dictionary_learning": dictionary_learning}[name]()
    versions = {}
    from importlib.metadata import version

    for pkg in ("torch", "sae-lens", "eai-sparsify", "dictionary-learning"):
        versions[pkg] = version(pkg)
    (OUT / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")


if __name__ == "__main__":
    main()
