"""CC3M as webdataset shards: where they come from, their names, and a download that never leaves half a file.

Two routes (notebook 09 uses both through `get_cc3m`):

- **hf**: [`pixparse/cc3m-wds`](https://huggingface.co/datasets/pixparse/cc3m-wds) holds CC3M as
  `cc3m-train-{0000..0575}.tar` (~5,045 pairs, ~0.46 GB each) and `cc3m-validation-{0000..0015}.tar`;
  `download_hf` fetches the first `n_shards` and one validation shard with `huggingface_hub` (a file lands
  under a temporary name and is renamed when complete);
- **img2dataset**: the URL list of `google-research-datasets/conceptual_captions`, downloaded and resized
  by [img2dataset](https://github.com/rom1504/img2dataset) (`pip install img2dataset`); many URLs are dead,
  so expect fewer pairs per shard.

From the command line (needs the internet; a complete shard already there is kept):

    python -m pdclip.data.cc3m --data-dir data/cc3m --shards 8 --route hf
    python -m pdclip.data.cc3m --data-dir data/cc3m --shards 8 --check   # only check, download nothing
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from pdclip.data.shards import require_shards

HF_REPO = "pixparse/cc3m-wds"
ROUTES = ("hf", "img2dataset")


def cc3m_urls(data_dir: str | Path, n_shards: int, route: str = "hf") -> tuple[str, str]:
    """The training and held-out shard URLs of a route, in brace notation (`{0000..0007}`)."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if route == "img2dataset":  # img2dataset numbers its shards 00000, 00001, ...
        return f"{data_dir}/train/{{00000..{n_shards - 1:05d}}}.tar", f"{data_dir}/validation/00000.tar"
    return f"{data_dir}/cc3m-train-{{0000..{n_shards - 1:04d}}}.tar", f"{data_dir}/cc3m-validation-0000.tar"


def download_hf(data_dir: str | Path, n_shards: int) -> None:
    """The first `n_shards` training shards and one validation shard of `pixparse/cc3m-wds`."""
    from huggingface_hub import hf_hub_download

    names = [f"cc3m-train-{i:04d}.tar" for i in range(n_shards)] + ["cc3m-validation-0000.tar"]
    for name in names:  # skips files already complete; a partial one is resumed, never renamed early
        hf_hub_download(HF_REPO, name, repo_type="dataset", local_dir=str(data_dir))


def download_img2dataset(data_dir: str | Path, n_shards: int, per_shard: int = 5000) -> None:
    """CC3M from its URL list with img2dataset: `n_shards` training shards and one validation shard."""
    from datasets import load_dataset
    from img2dataset import download

    for split, n in (("train", n_shards * per_shard), ("validation", per_shard)):
        rows = load_dataset("google-research-datasets/conceptual_captions", split=split, streaming=True).take(n)
        tsv = Path(data_dir) / f"{split}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        with open(tsv.with_suffix(".tmp"), "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["url", "caption"])
            writer.writerows((r["image_url"], r["caption"]) for r in rows)
        tsv.with_suffix(".tmp").replace(tsv)  # a list cut short is never read as the whole list
        download(url_list=str(tsv), input_format="tsv", url_col="url", caption_col="caption",
                 output_format="webdataset", output_folder=f"{data_dir}/{split}", image_size=256,
                 resize_mode="center_crop", number_sample_per_shard=per_shard)


DOWNLOADERS = {"hf": download_hf, "img2dataset": download_img2dataset}


def get_cc3m(data_dir: str | Path, n_shards: int, download: str | None = None,
             route: str | None = None) -> tuple[list[str], list[str]]:
    """The training and held-out shard paths under `data_dir`, checked complete (`require_shards`).

    Args:
        download: None: only check, and raise a FileNotFoundError saying how to get what is missing;
            "hf" or "img2dataset": fetch what is missing by that route first.
        route: whose shard names to expect; by default `download`'s, else "hf".
    """
    route = route or download or "hf"
    train_spec, heldout_spec = cc3m_urls(data_dir, n_shards, route)
    how = (f"python -m pdclip.data.cc3m --data-dir {data_dir} --shards {n_shards} --route hf (Hugging Face, "
           f"{HF_REPO}) or --route img2dataset (the URL list); or put the shards in {data_dir}")
    try:
        require_shards([train_spec, heldout_spec], how)
    except FileNotFoundError:
        if not download:
            raise
        DOWNLOADERS[route](data_dir, n_shards)
    return require_shards(train_spec, how), require_shards(heldout_spec, how)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="where the shards go")
    parser.add_argument("--shards", type=int, default=8, help="training shards (of 576; ~0.46 GB each)")
    parser.add_argument("--route", choices=ROUTES, default="hf")
    parser.add_argument("--check", action="store_true", help="only check the shards there; download nothing")
    args = parser.parse_args(argv)
    try:
        train, heldout = get_cc3m(args.data_dir, args.shards, None if args.check else args.route, args.route)
    except FileNotFoundError as e:
        parser.exit(1, f"error: {e}\n")
    print(f"{len(train)} training shards and {len(heldout)} held-out shard(s) complete in {args.data_dir}")


if __name__ == "__main__":
    main()
