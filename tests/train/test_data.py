"""Data pipelines: packing, splits, determinism, exact resume, host sharding, sources, tokenizers."""

import json
import re

import grain
import numpy as np
import pytest
import sentencepiece
import tensorflow_datasets as tfds

from arch.config import ConfigError
from train import data
from train.config import DataConfig
from train.tokenizer import ByteTokenizer, SentencePieceTokenizer, make_tokenizer

BYTES = ByteTokenizer()
DOCUMENT_COUNT = 12


def write_corpus(directory, count=DOCUMENT_COUNT):
    """Files whose text is one repeated marker "<i>", so any run of bytes names its document."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (directory / f"doc{index:02d}.txt").write_text(f"<{index:03d}>" * (3 + 2 * index) + "\n")
    return directory


def text_config(tmp_path, **changes):
    corpus = write_corpus(tmp_path / "corpus")
    fields = dict(paths=str(corpus / "*.txt"), seq_len=16, batch_size=4, eval_batches=3, prefetch=0)
    return DataConfig(**{**fields, **changes})


def document_ids(sequences):
    """Markers found in int32[..., n] token sequences, each sequence decoded on its own."""
    texts = [BYTES.decode(sequence) for sequence in np.reshape(sequences, (-1, np.shape(sequences)[-1]))]
    return {int(match) for text in texts for match in re.findall(r"<(\d{3})>", text)}


def packed_sequences(batch):
    """The int32[b, L + 1] sequences a language-model batch was cut from."""
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(expected, actual):
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual, strict=True):
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_array_equal(want[name], got[name], err_msg=name)


# ---------------------------------------------------------------------------
# Text files: format, packing, splits, determinism


def test_batches_have_the_documented_format(tmp_path):
    cfg = text_config(tmp_path)
    for batch in [next(data.train_iterator(cfg)), next(iter(data.eval_batches(cfg)))]:
        assert set(batch) == {"inputs", "targets", "mask"}
        assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (4, 16)
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        assert batch["mask"].dtype == np.float32
        np.testing.assert_array_equal(batch["mask"], 1.0)
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


def test_eval_packs_held_out_documents_in_order_with_eos_between(tmp_path):
    cfg = text_config(tmp_path)
    documents = data.split_dataset(cfg, "eval")
    one_pass = np.concatenate([np.append(BYTES.encode(documents[i]), BYTES.eos_id) for i in range(len(documents))])
    batches = list(data.eval_batches(cfg))
    assert len(batches) == cfg.eval_batches
    stream = np.concatenate([packed_sequences(batch).ravel() for batch in batches])
    # A held-out split shorter than the requested batches is read again from its start.
    expected = np.tile(one_pass, len(stream) // len(one_pass) + 1)[: len(stream)]
    np.testing.assert_array_equal(stream, expected)
    assert_batches_equal(batches, list(data.eval_batches(cfg)))


def test_train_rows_stream_whole_documents_and_cover_the_split(tmp_path):
    cfg = text_config(tmp_path)
    train_documents = data.split_dataset(cfg, "train")
    whole_documents = {bytes(train_documents[i]) for i in range(len(train_documents))}
    batches = take(data.train_iterator(cfg), 40)
    seen = set()
    for row in range(cfg.batch_size):
        stream = np.concatenate([packed_sequences(batch)[row] for batch in batches])
        first, *middle, _ = BYTES.decode(stream).encode().split(b"\0")
        # Each row starts inside its first document, then reads whole documents.
        assert any(document.endswith(first) for document in whole_documents)
        assert middle and set(middle) <= whole_documents
        seen |= set(middle)
    assert seen == whole_documents


def test_held_out_files_are_disjoint_from_training_files(tmp_path):
    cfg = text_config(tmp_path)
    train = data.split_dataset(cfg, "train")
    held_out = data.split_dataset(cfg, "eval")
    train_ids = document_ids(np.concatenate([BYTES.encode(train[i]) for i in range(len(train))]))
    eval_ids = document_ids(np.concatenate([BYTES.encode(held_out[i]) for i in range(len(held_out))]))
    assert eval_ids and not train_ids & eval_ids
    assert train_ids | eval_ids == set(range(DOCUMENT_COUNT))
    # The split belongs to the files, not to the run's seed.
    reseeded = data.split_dataset(cfg.replace(seed=7), "eval")
    assert [reseeded[i] for i in range(len(reseeded))] == [held_out[i] for i in range(len(held_out))]


def test_same_seed_same_batches_other_seed_other_batches(tmp_path):
    cfg = text_config(tmp_path)
    first = take(data.train_iterator(cfg), 5)
    assert_batches_equal(first, take(data.train_iterator(cfg), 5))
    other = take(data.train_iterator(cfg.replace(seed=1)), 5)
    assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_restored_state_continues_exactly(tmp_path, prefetch):
    cfg = text_config(tmp_path, prefetch=prefetch)
    iterator = data.train_iterator(cfg)
    take(iterator, 5)
    state = json.loads(json.dumps(data.iterator_state(iterator)))
    expected = take(iterator, 12)
    resumed = data.train_iterator(cfg)
    data.restore_iterator_state(resumed, state)
    assert_batches_equal(expected, take(resumed, 12))


def test_processes_read_disjoint_shards_with_half_the_batch_each(tmp_path):
    cfg = text_config(tmp_path)
    seen = []
    for process_index in range(2):
        batches = take(data.train_iterator(cfg, process_index=process_index, process_count=2), 20)
        assert batches[0]["inputs"].shape == (2, 16)
        seen.append(document_ids(np.stack([packed_sequences(batch) for batch in batches])))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # Evaluation gives the same global batches however many processes share them.
    whole = list(data.eval_batches(cfg))
    halves = [list(data.eval_batches(cfg, process_index=i, process_count=2)) for i in range(2)]
    assert halves[0][0]["inputs"].shape == (2, 16)
    joined = [{name: np.concatenate([a[name], b[name]]) for name in a} for a, b in zip(*halves, strict=True)]
    assert_batches_equal(whole, joined)


def test_a_single_file_trains_but_holds_nothing_out(tmp_path):
    cfg = text_config(tmp_path, paths=str(tmp_path / "corpus" / "doc05.txt"))
    assert document_ids(next(data.train_iterator(cfg))["inputs"]) == {5}
    with pytest.raises(ConfigError, match=r"data\.paths: only 1 file"):
        data.eval_batches(cfg)


def test_embedded_corpus_is_the_standard_library(tmp_path):
    cfg = DataConfig(seq_len=64, batch_size=4, eval_batches=2)
    assert cfg.paths == ""
    assert len(data.split_dataset(cfg, "train")) > 500
    assert len(data.split_dataset(cfg, "eval")) > 0
    batches = take(data.train_iterator(cfg), 3)
    assert batches[0]["inputs"].shape == (4, 64)
    assert len(list(data.eval_batches(cfg))) == 2


# ---------------------------------------------------------------------------
# Validation


def test_config_validation_names_the_wrong_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.source: unknown source 'nope'; registered sources: .*text, tfds"):
        DataConfig(source="nope")
    with pytest.raises(ConfigError, match=r"data\.spm_model: file .* does not exist"):
        DataConfig(tokenizer="sentencepiece", spm_model=str(tmp_path / "absent.model"))
    with pytest.raises(ConfigError, match=r"data\.task: unknown option 'lenght'"):
        DataConfig(source="memzoo-test-counting", task={"lenght": 8})


def test_pipeline_errors_name_the_wrong_field(tmp_path):
    cfg = text_config(tmp_path)
    missing = str(tmp_path / "nowhere" / "*.txt")
    with pytest.raises(ConfigError, match=rf"data\.paths: no files match '{re.escape(missing)}'"):
        data.train_iterator(cfg.replace(paths=f"{cfg.paths},{missing}"))
    with pytest.raises(ConfigError, match=r"data\.batch_size: 4 does not split evenly across 3 processes"):
        data.train_iterator(cfg, process_index=0, process_count=3)


# ---------------------------------------------------------------------------
# TFDS: a tiny dataset built without TensorFlow, read back through tfds.data_source


class MemzooTestText(tfds.core.GeneratorBasedBuilder):
    """One document per line of train.txt / validation.txt in the manual directory."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Write train.txt and validation.txt, one document per line, into the manual dir."

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {
            split: self._generate_examples(dl_manager.manual_dir / f"{split}.txt") for split in ("train", "validation")
        }

    def _generate_examples(self, path):
        for index, line in enumerate(path.read_text().splitlines()):
            yield index, {"text": line}


@pytest.fixture(scope="module")
def tfds_data_dir(tmp_path_factory):
    text_dir = tmp_path_factory.mktemp("tfds_text")
    (text_dir / "train.txt").write_text("".join(f"<{i:03d}>" * 4 + "\n" for i in range(8)))
    (text_dir / "validation.txt").write_text("".join(f"<{i:03d}>" * 4 + "\n" for i in range(100, 103)))
    data_dir = tmp_path_factory.mktemp("tfds_data")
    tfds.disable_progress_bar()
    builder = MemzooTestText(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(text_dir)))
    return data_dir


def tfds_config(data_dir, **changes):
    return DataConfig(source="tfds", tfds_name="memzoo_test_text", tfds_data_dir=str(data_dir), **changes)


def test_tfds_source_reads_a_prepared_array_record_dataset(tfds_data_dir):
    cfg = tfds_config(tfds_data_dir, seq_len=16, batch_size=2)
    assert len(data.split_dataset(cfg, "train")) == 8
    train_ids = document_ids(np.stack([packed_sequences(b) for b in take(data.train_iterator(cfg), 20)]))
    assert train_ids == set(range(8))
    eval_ids = document_ids(np.stack([packed_sequences(b) for b in data.eval_batches(cfg)]))
    assert eval_ids == {100, 101, 102}


def test_tfds_source_explains_a_missing_dataset(tmp_path):
    cfg = tfds_config(tmp_path, batch_size=2)
    with pytest.raises(ConfigError, match=r"data\.tfds_name: cannot read TFDS dataset .*--file_format=array_record"):
        data.train_iterator(cfg)


def test_tfds_source_checks_the_text_key(tfds_data_dir):
    cfg = tfds_config(tfds_data_dir, tfds_text_key="body")
    with pytest.raises(ConfigError, match=r"data\.tfds_text_key: 'body' is not a feature .* text"):
        data.split_dataset(cfg, "train")


# ---------------------------------------------------------------------------
# "examples" sources: ready fixed-length examples with a mask


COUNTING_EXAMPLES = 50
COUNTING_OPTIONS = ("vocab", "length")


def check_counting_options(cfg):
    for option in cfg.task:
        if option not in COUNTING_OPTIONS:
            raise ConfigError(f"data.task: unknown option {option!r} for {cfg.source!r}; options: {COUNTING_OPTIONS}")


@data.register_source(
    "memzoo-test-counting",
    kind="examples",
    validate=check_counting_options,
    vocab_size=lambda cfg: cfg.task.get("vocab", 64),
)
def counting_examples(cfg, split):
    """Example i counts up from i (held-out ones from 100 + i); only the last target is scored, like a recall query."""
    offset = 0 if split == "train" else 100
    length = cfg.task.get("length", cfg.seq_len)

    def example(index):
        tokens = np.arange(length + 1) + index + offset
        mask = np.zeros(length, np.float32)
        mask[-1] = 1.0
        return {"inputs": tokens[:-1], "targets": tokens[1:], "mask": mask}

    return grain.MapDataset.range(COUNTING_EXAMPLES).map(example)


def test_examples_source_batches_resume_and_vocabulary():
    cfg = DataConfig(source="memzoo-test-counting", seq_len=8, batch_size=4, eval_batches=2, task={"vocab": 12})
    assert data.tokenizer_vocab_size(cfg) == 12
    iterator = data.train_iterator(cfg)
    batch = next(iterator)
    assert batch["inputs"].shape == batch["mask"].shape == (4, 8)
    assert batch["inputs"].dtype == np.int32 and batch["mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["mask"].sum(axis=1), 1.0)
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
    state = json.loads(json.dumps(data.iterator_state(iterator)))
    expected = take(iterator, 20)  # past one epoch of 50 examples: the reshuffled order resumes too
    resumed = data.train_iterator(cfg)
    data.restore_iterator_state(resumed, state)
    assert_batches_equal(expected, take(resumed, 20))
    evaluation = list(data.eval_batches(cfg))
    assert len(evaluation) == 2
    assert_batches_equal(evaluation, list(data.eval_batches(cfg)))
    assert evaluation[0]["inputs"][:, 0].tolist() == [100, 101, 102, 103]


def test_every_epoch_reads_each_example_once_in_a_new_order():
    cfg = DataConfig(source="memzoo-test-counting", seq_len=8, batch_size=5)
    batches = take(data.train_iterator(cfg), 2 * COUNTING_EXAMPLES // 5)
    order = np.concatenate([batch["inputs"][:, 0] for batch in batches])
    first, second = order[:COUNTING_EXAMPLES], order[COUNTING_EXAMPLES:]
    assert sorted(first) == sorted(second) == list(range(COUNTING_EXAMPLES))
    assert first.tolist() != second.tolist()


def test_examples_of_the_wrong_length_are_reported():
    cfg = DataConfig(source="memzoo-test-counting", seq_len=4, batch_size=2, task={"length": 8})
    with pytest.raises(ValueError, match=r"'inputs' has shape \(8,\); expected \(4,\) for data.seq_len=4"):
        next(data.train_iterator(cfg))


# ---------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trips_utf8():
    text = "naïve café → 東京\n"
    ids = BYTES.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode())
    assert BYTES.decode(ids) == text
    assert BYTES.decode([104, 105, 300]) == "hi\ufffd"  # ids beyond a byte never wrap onto real bytes


def test_sentencepiece_tokenizer(tmp_path):
    corpus = tmp_path / "spm.txt"
    corpus.write_text("".join(f"the quick brown fox {i} jumps over the lazy dog {7 * i}\n" for i in range(200)))
    for prefix, eos in [("with_eos", 2), ("without_eos", -1)]:
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(tmp_path / prefix), vocab_size=64, eos_id=eos, minloglevel=2
        )
    cfg = text_config(tmp_path, tokenizer="sentencepiece", spm_model=str(tmp_path / "with_eos.model"))
    tokenizer = make_tokenizer(cfg)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert tokenizer.vocab_size == data.tokenizer_vocab_size(cfg) == 64
    assert tokenizer.eos_id == 2
    text = "the lazy fox 42 jumps"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    assert tokenizer.decode(ids) == text
    assert SentencePieceTokenizer(str(tmp_path / "without_eos.model")).eos_id == 0
    batch = next(data.train_iterator(cfg))
    assert batch["inputs"].shape == (4, 16) and batch["inputs"].max() < 64
    assert data.tokenizer_vocab_size(text_config(tmp_path)) == 256
