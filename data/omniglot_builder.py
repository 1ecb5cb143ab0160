"""The tensorflow-datasets builder of Omniglot (`OmniglotZips`, one `OmniglotConfig` per subset of the zips):
each original zip, taken from a folder or downloaded and checked (`data.omniglot_files`), written as one
split of 28x28 uint8 images with their labels in array_record files.

tfds without TensorFlow: `download_and_prepare` with array_record and `as_data_source` work; `tfds.load`,
`as_dataset`/`as_numpy`, archive extraction and tfrecord writing need TensorFlow, and the download
manager only fetches http(s) URLs (other schemes go through `tf.io.gfile`).
"""

from __future__ import annotations

import dataclasses
import itertools
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from data.omniglot_files import IMAGE_SIZE, PNG_NAME, ZIPS, to_28x28, verify_zip


@dataclasses.dataclass(eq=False)
class OmniglotConfig(tfds.core.BuilderConfig):
    """Which zips to build, one split each; the config name (and cache folder) is derived from them."""

    splits: tuple[str, ...] = ()


class OmniglotZips(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Omniglot from its original zips: one split per zip, 28x28 uint8 images with their labels.

    Features: `image uint8 [28, 28]` (ink 255), `alphabet` (e.g. b"Greek"), `character` (b"character01"),
    `label` (the global character number in the file name), `drawer` (1..20).
    Zips are taken from the download config's `manual_dir`; missing ones are downloaded from `base_url`
    unless it is None. Every zip's sha256 is checked before anything is written. Not registered in tfds'
    global registry (so that re-importing this module is harmless): construct it directly.
    """

    name = "maml_omniglot"
    VERSION = tfds.core.Version("1.0.0")
    disable_shuffling = True  # records stay in zip order; `load_splits` sorts anyway
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put any of " + ", ".join(i.filename for i in ZIPS.values()) + " in manual_dir."
    BUILDER_CONFIGS = [  # one per non-empty subset of the zips, named like "small1-small2"
        OmniglotConfig(name="-".join(subset), splits=subset, description="Omniglot zips: " + ", ".join(subset))
        for size in range(1, len(ZIPS) + 1)
        for subset in itertools.combinations(ZIPS, size)
    ]

    def __init__(self, *, splits: Sequence[str], base_url: str | None = None, **kwargs):
        requested = tuple(splits)
        if not requested or any(s not in ZIPS for s in requested):
            raise ValueError(f"OmniglotZips: splits={requested!r}; expected a non-empty subset of {tuple(ZIPS)}")
        self._base_url = base_url
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config="-".join(s for s in ZIPS if s in requested), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Omniglot handwritten characters, 28x28 uint8 (ink 255), from the original zips.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8),
                    "alphabet": tfds.features.Text(),
                    "character": tfds.features.Text(),
                    "label": np.int32,
                    "drawer": np.int32,
                }
            ),
            homepage="https://github.com/brendenlake/omniglot",
        )

    def _split_generators(self, dl_manager):
        try:
            manual = Path(dl_manager.manual_dir)
        except (AssertionError, ValueError):  # tfds raises AssertionError when manual_dir is absent or empty
            manual = None
        paths, missing = {}, []
        for split in self.builder_config.splits:
            local = manual / ZIPS[split].filename if manual is not None else None
            if local is not None and local.is_file():
                paths[split] = local
            else:
                missing.append(split)
        if missing and self._base_url is None:
            names = ", ".join(ZIPS[s].filename for s in missing)
            where = manual if manual is not None else "manual_dir (none given, or empty)"
            raise ValueError(
                f"omniglot: {names} not found in {where}; expected the original zip files there (or download=True)"
            )
        urls = {s: self._base_url + ZIPS[s].filename for s in missing}
        if urls:
            paths.update({s: Path(p) for s, p in dl_manager.download(urls).items()})
        for split, path in paths.items():
            try:
                verify_zip(path, split, urls.get(split))
            except ValueError:
                if split in missing:  # drop a bad download so that the next try fetches it again
                    path.unlink(missing_ok=True)
                    Path(f"{path}.INFO").unlink(missing_ok=True)
                raise
        return {split: self._generate_examples(paths[split]) for split in self.builder_config.splits}

    def _generate_examples(self, path: Path) -> Iterator[tuple[str, dict]]:
        with zipfile.ZipFile(path) as archive:
            for name in sorted(archive.namelist()):
                match = PNG_NAME.match(name)
                if match is None:
                    continue
                alphabet, character, label, drawer = match.groups()
                yield f"{alphabet}/{character}/{drawer}", {
                    "image": to_28x28(archive.read(name)),
                    "alphabet": alphabet,
                    "character": character,
                    "label": int(label),
                    "drawer": int(drawer),
                }
