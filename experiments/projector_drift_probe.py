"""Do the words stage 0' puts on the image tokens survive stages 1 and 2? The same test tokens, read through the
projector as stage 0' left it, as stage 1 (projector alone, captions) left it and as the finished build ships it.

Stage 0' (`small_build.fact_align`) teaches the tower's tail and the projector to put each patch's words on its token
(nearest LM word embedding by cosine); stage 1 then trains the projector alone on the LM's caption loss, and stage 2
trains it whole beside the LoRA. The tail is frozen after stage 0' (`TailFeatures`), so only the projector can move
the tokens away from the words. Scored as `fact_align` scores itself (`fact_accuracy`, the same table of the build's
targets + random words): things' tokens whose nearest word is one of theirs, written words read off the bag.

    LLACA_HOME=bench_results/small_build15/work/home PYTHONPATH=. python -m experiments.projector_drift_probe \\
        --run $LLACA_HOME/cache/small-build-seed0-a150-t550-b16-twin-facts10-centre-one-group10-pad32 \\
        --adapter bench_results/small_build15/work/adapter --readout twin \\
        --out bench_results/small/projector_drift_build15.json
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from llaca.paths import atomic_write_json, llaca_home


def adapter_projector(adapter: Path) -> dict[str, torch.Tensor]:
    """The projector's weights in a stored build adapter (saved whole, as peft's modules_to_save)."""
    from llaca.bases.small import adapter_tensors

    return {k.split("multi_modal_projector.")[-1].replace("modules_to_save.default.", ""): v.float()
            for k, v in adapter_tensors(adapter).items() if "multi_modal_projector" in k}


def main(argv=None) -> int:
    from safetensors.torch import load_file

    from llaca.bases import small_build as B
    from llaca.bench.small import machine_stamp

    from .stage0_data import build_records, front_cache, stage0_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="the build's run folder (stages 0'-1 and checkpoints)")
    p.add_argument("--adapter", type=Path, required=True, help="the finished build's adapter folder")
    p.add_argument("--readout", default="twin")
    p.add_argument("--centre-word", default="one", help="the build's --fact-centre-word ('-': none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    home = llaca_home()
    centre = None if a.centre_word == "-" else a.centre_word
    _, tune, test, scenes = build_records(home, a.seed)
    model, processor = stage0_model(a.run, a.seed, a.readout)
    test_images = [r.image for r in test]
    cache = front_cache(home, model, processor, [str(i) for i in test_images], readout=a.readout)
    grid = cache[test_images[0]].shape[-1]
    tokenizer = processor.tokenizer
    targets = [B.patch_targets(scenes[str(r.image)], tokenizer, grid, centre) for r in tune]
    test_targets = [B.patch_targets(scenes[str(i)], tokenizer, grid, centre) for i in test_images]
    emb = model.get_input_embeddings().weight.detach().float()
    _, index, table = B.embedding_table(emb, [t for per in targets + test_targets for t in per], 4096,
                                        torch.Generator().manual_seed(a.seed))
    projector = B.projector_of(model)
    states = {"stage 0'": {k: v.clone() for k, v in projector.state_dict().items()},
              "stage 1": load_file(str(a.run / "projector.safetensors")),
              "finished build": adapter_projector(a.adapter)}
    rows = {}
    for name, state in states.items():
        projector.load_state_dict({k: v.float() for k, v in state.items()})
        row = {}
        for part, whole in (("things", False), ("words", True)):
            chosen = [i for i, im in enumerate(test_images) if (scenes[str(im)].kind == "text") == whole]
            row[part] = round(100 * B.fact_accuracy(model, [test_images[i] for i in chosen],
                                                    [test_targets[i] for i in chosen], cache, table, index,
                                                    B.FACT_BLOCKS, whole=whole), 1)
        rows[name] = row
        print(name, row, flush=True)
    atomic_write_json(a.out, {"run": str(a.run), "adapter": str(a.adapter), "test_images": len(test_images),
                              "accuracy": rows, "seconds": round(time.time() - t0, 1), **machine_stamp()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
