"""Tokenizer: load, train a small base (demo), extend the official base to a new script, verify.

Extension appends to the base ModelProto and never touches the base pieces (docs/design.md §2), so every
base id keeps its meaning and the base rows of the GPT text embedding stay valid.
"""

from __future__ import annotations

import io
import json
import math
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sentencepiece as spm
from fidel_tts.trainer.errors import FidelError
from fidel_tts.trainer.hashing import file_sha256, sha256_bytes
from fidel_tts.trainer.markdown import bullets, table
from fidel_tts.trainer.report import Check
from fidel_tts.trainer.text.normalize import (
    is_script_char,
    normalize_text,
    normalizer_record,
    recorded_fold,
    script_letters,
    script_share,
)
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as model_pb2

Piece = model_pb2.ModelProto.SentencePiece
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (
    Piece.NORMAL, Piece.UNKNOWN, Piece.CONTROL, Piece.USER_DEFINED, Piece.UNUSED, Piece.BYTE)

MIN_SCRIPT_SHARE = 0.5  # a target corpus with fewer letters of the new script is the wrong corpus
MAX_TOKENS_PER_WORD = 6.0
MISSING_CHAR_SCORE_MARGIN = 1.0  # chars the unigram trainer dropped score this far below everything else
SIZING_ROUNDS = 3  # unigram reruns that add the shortfall before the run that asks for everything
EVERYTHING = 1_000_000  # a unigram request no corpus fills: hard_vocab_limit=False returns all it supports
MAX_SIZE = "max"

# Raw base-language text: the extension must tokenise these exactly as the base does.
BASE_SAMPLES: tuple[str, ...] = (
    "HELLO WORLD, THIS IS A TEST.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!",
    "WHAT TIME IS IT? IT'S ALMOST SEVEN - LET'S GO.",
    "今天天气很好，我们去公园散步吧。",
    "我爱北京天安门，欢迎你来中国。",
    "NI3 HAO3 SHI4 JIE4",
)


# ----------------------------------------------------------------------------- loading and writing

def load_model_proto(path: str | Path) -> model_pb2.ModelProto:
    """The ModelProto in a .model file; FidelError if it is missing, empty or not a sentencepiece model."""
    path = Path(path)
    if not path.is_file():
        raise FidelError(path, "tokenizer model not found")
    data = path.read_bytes()
    if not data:
        raise FidelError(path, "tokenizer model is empty (0 bytes)")
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, ValueError) as e:
        raise FidelError(path, f"not a sentencepiece model (protobuf parse failed: {e})") from None
    if len(proto.pieces) == 0:
        raise FidelError(path, "not a sentencepiece model (no pieces)")
    processor_from_proto(proto, path)  # sentencepiece's own checks (duplicate pieces, missing <unk>, ...)
    return proto


def processor_from_proto(proto: model_pb2.ModelProto, path: str | Path | None = None) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto.SerializeToString())
    except (RuntimeError, OSError) as e:
        raise FidelError(path, f"not a valid sentencepiece model ({str(e).strip().splitlines()[-1]})") from None
    return sp


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    """A SentencePieceProcessor for path; FidelError on a missing, empty or corrupt file."""
    return processor_from_proto(load_model_proto(path), path)


def encode(sp: spm.SentencePieceProcessor, text: str, fold: bool = False) -> list[int]:
    """Token ids of normalize_text(text). No BOS/EOS: the GPT adds start (0) and stop (1) itself."""
    return sp.encode(normalize_text(text, fold=fold), out_type=int)


def write_model(proto: model_pb2.ModelProto, out_path: Path) -> str:
    """Write out_path (.model) and the .vocab beside it; return the sha256 of the .model bytes."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = proto.SerializeToString()
    out_path.write_bytes(data)
    vocab = "".join(f"{p.piece}\t{p.score:g}\n" for p in proto.pieces)
    out_path.with_suffix(".vocab").write_text(vocab, encoding="utf-8")
    return sha256_bytes(data)


def train_in_memory(lines: list[str], error_path: str | Path, **options) -> model_pb2.ModelProto:
    """Run the sentencepiece trainer on lines held in memory; no files are read or written."""
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer, num_threads=1,
                                       minloglevel=2, **options)
    except (RuntimeError, OSError) as e:
        raise FidelError(error_path, f"sentencepiece training failed ({str(e).strip().splitlines()[-1]})") from None
    proto = model_pb2.ModelProto()
    proto.ParseFromString(writer.getvalue())
    return proto


def tag_piece(tag: str) -> str:
    """ "AM", "[AM]" or "▁[AM]" -> "▁[AM]", the form the official base uses for its language tags."""
    tag = tag.removeprefix("▁").strip("[]")
    return f"▁[{tag}]"


def train_base_tokenizer(texts: list[str], out_path: Path, vocab_size: int,
                         lang_tags: Iterable[str] = ("[ZH]", "[EN]", "[JA]", "[KO]")) -> Path:
    """Train a small base built like the official one (for the demo and tests): UNIGRAM over upper-cased
    text, <s>=0 </s>=1 <unk>=2, no pad, language tags as USER_DEFINED pieces from id 3, no byte fallback."""
    out_path = Path(out_path)
    lines = [line for line in map(normalize_text, texts) if line]
    if not lines:
        raise FidelError(out_path, "no text to train the base tokenizer on")
    spm.set_random_generator_seed(0)
    proto = train_in_memory(
        lines, out_path, model_type="unigram", vocab_size=vocab_size, character_coverage=1.0,
        normalization_rule_name="nmt_nfkc", bos_id=0, eos_id=1, unk_id=2, pad_id=-1,
        user_defined_symbols=[tag_piece(t) for t in lang_tags], byte_fallback=False, split_digits=False,
        max_sentencepiece_length=16, hard_vocab_limit=True)
    write_model(proto, out_path)
    return out_path


# ----------------------------------------------------------------------------- corpus

def read_corpus_files(paths: Iterable[str | Path]) -> tuple[list[str], list[dict]]:
    """Non-empty lines of UTF-8 text files, and one {path, lines, sha256} record per file."""
    texts, sources = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise FidelError(path, "corpus file not found")
        data = path.read_bytes()
        try:
            lines = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise FidelError(path, f"corpus file is not UTF-8 text (byte {e.start})") from None
        if not lines:
            raise FidelError(path, "corpus file has no text lines")
        texts.extend(lines)
        sources.append({"path": str(path), "lines": len(lines), "sha256": sha256_bytes(data)})
    return texts, sources


def corpus_label(sources: list[dict]) -> str:
    """What an error message calls the corpus: its file names (first three)."""
    paths = [s["path"] for s in sources]
    return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def normalised_corpus(texts: list[str], label: str, script: str = "ethiopic", fold: bool = False) -> list[str]:
    lines = [line for line in (normalize_text(t, fold=fold) for t in texts) if line]
    if not lines:
        raise FidelError(label, "corpus is empty (no text after normalisation)")
    share = script_share("".join(lines), script)
    if share < MIN_SCRIPT_SHARE:
        raise FidelError(label, f"corpus is in the wrong script: {share:.0%} of its letters are {script} "
                                f"(need at least {MIN_SCRIPT_SHARE:.0%})")
    return lines


# ----------------------------------------------------------------------------- extension

@dataclass
class ExtensionRecord:
    base_path: str
    base_sha256: str
    base_size: int
    target_size: int
    out_path: str
    out_sha256: str
    script_chars_added: int
    script_chars: str
    lang_tag: str | None
    lang_tag_id: int | None
    unigram_pieces_added: int
    unigram_pieces_offered: int  # script pieces the trained unigram model had after de-duplication
    corpus_lines: int
    corpus_sources: list[dict] = field(default_factory=list)
    seed: int = 0
    largest_size: int | None = None  # measured only when sizing needed the run that asks for everything
    normalizer: dict = field(default_factory=normalizer_record)
    sentencepiece_version: str = spm.__version__

    def to_dict(self) -> dict:
        return asdict(self)


def check_extendable(base: model_pb2.ModelProto, base_path: Path) -> None:
    model_type = model_pb2.TrainerSpec.ModelType.Name(base.trainer_spec.model_type)
    if base.trainer_spec.model_type != model_pb2.TrainerSpec.UNIGRAM:
        raise FidelError(base_path, f"base model_type is {model_type}; only UNIGRAM bases can take "
                                    f"log-prob scored pieces")
    byte_pieces = sum(p.type == BYTE for p in base.pieces)
    if byte_pieces or base.trainer_spec.byte_fallback:
        raise FidelError(base_path, f"base uses byte_fallback ({byte_pieces} byte pieces); the new script would "
                                    f"encode as bytes, extend a base without byte fallback")


def script_chars_of(lines: list[str], base_sp: spm.SentencePieceProcessor, script: str) -> list[str]:
    """Every letter of the script, seen in the corpus or not, and any other script character the corpus
    has, in the form the base's own normaliser hands to the model."""
    seen = set(base_sp.normalize("".join(script_letters(script))))
    for line in lines:
        seen.update(base_sp.normalize(line))
    return sorted(ch for ch in seen if is_script_char(ch, script))


def unigram_offer(lines: list[str], label: str, base: model_pb2.ModelProto, request: int,
                  script: str) -> tuple[dict[str, float], list[tuple[float, str]]]:
    """Train a unigram model asking for request pieces; its scores, and its multi-char pieces with a script
    letter that the base lacks, best first."""
    unigram = train_in_memory(
        lines, label, model_type="unigram", vocab_size=request,
        character_coverage=1.0, normalization_rule_name=base.normalizer_spec.name or "nmt_nfkc",
        bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1, byte_fallback=False, hard_vocab_limit=False,
        max_sentencepiece_length=base.trainer_spec.max_sentencepiece_length or 16)
    scores = {p.piece: p.score for p in unigram.pieces if p.type == NORMAL}
    known = {p.piece for p in base.pieces}
    offered = sorted(((score, piece) for piece, score in scores.items()
                      if len(piece) > 1 and any(is_script_char(ch, script) for ch in piece) and piece not in known),
                     key=lambda sp: (-sp[0], sp[1]))
    return scores, offered


def sized_offer(lines: list[str], label: str, base: model_pb2.ModelProto, needed: int | None, script: str,
                seed: int) -> tuple[dict[str, float], list[tuple[float, str]], bool]:
    """Unigram pieces for needed slots (None: as many as the corpus supports). Pieces without a script
    letter are filtered out after training, so each rerun asks again with the shortfall added; the last
    asks for everything, which is what a too-large target is measured against. Third value: that last
    run was made."""
    request = needed + len(set("".join(lines))) + max(64, needed // 50) if needed else EVERYTHING
    for _ in range(SIZING_ROUNDS if needed else 0):
        spm.set_random_generator_seed(seed)
        scores, offered = unigram_offer(lines, label, base, request, script)
        if len(offered) >= needed:
            return scores, offered, False
        request += int((needed - len(offered)) * 1.25) + 64
    spm.set_random_generator_seed(seed)
    return *unigram_offer(lines, label, base, EVERYTHING, script), True


def extend_tokenizer(base_path: str | Path, corpus_texts: list[str], out_path: Path, target_size: int | str,
                     lang_tag: str | None = None, corpus_sources: list[dict] | None = None,
                     seed: int = 0, fold: bool = False) -> ExtensionRecord:
    """Append script characters, an optional language tag and corpus unigram pieces to the base until it has
    exactly target_size pieces ("max": as many as the corpus supports). fold: same-sound letter folding in
    the normaliser, recorded with its version. Writes out_path, its .vocab and its .json record."""
    base_path, out_path = Path(base_path), Path(out_path)
    base = load_model_proto(base_path)
    check_extendable(base, base_path)
    if out_path.resolve() == base_path.resolve():
        raise FidelError(out_path, "output path is the base model; refusing to overwrite the base")
    base_sp = processor_from_proto(base, base_path)
    if corpus_sources is None:
        corpus_sources = [{"path": "<in-memory corpus>", "lines": len(corpus_texts),
                           "sha256": sha256_bytes("\n".join(corpus_texts).encode("utf-8"))}]
    label = corpus_label(corpus_sources)
    script = "ethiopic"
    lines = normalised_corpus(corpus_texts, label, script, fold)

    base_size = len(base.pieces)
    known = {p.piece for p in base.pieces}
    chars = [ch for ch in script_chars_of(lines, base_sp, script) if ch not in known]
    tag = tag_piece(lang_tag) if lang_tag else None
    if tag in known:
        raise FidelError(base_path, f"base already has the language tag {tag}")
    fixed = base_size + len(chars) + (tag is not None)
    if target_size != MAX_SIZE and target_size <= fixed:
        raise FidelError(base_path, f"target size {target_size} leaves no room for unigram pieces: base {base_size} "
                                    f"+ {len(chars)} script characters{' + 1 tag' if tag else ''} = {fixed}")
    needed = None if target_size == MAX_SIZE else target_size - fixed
    unigram_scores, offered, measured = sized_offer(lines, label, base, needed, script, seed)
    largest = fixed + len(offered) if measured else None
    if needed is None:
        needed, target_size = len(offered), largest
    if len(offered) < needed:
        raise FidelError(label, f"corpus supports at most size {largest} (base {base_size} + {len(chars)} script "
                                f"characters{' + 1 tag' if tag else ''} + {len(offered)} unigram pieces), not "
                                f"{target_size}; use --size {largest} or --size max, or add text")

    # Scores: the unigram model's own log-probs, so Viterbi over the new pieces segments as the trained model
    # does (longer pieces win whenever the model found them likelier). Capped at the base's best NORMAL
    # score, because sentencepiece scales user-defined pieces by that maximum.
    base_normal_scores = [p.score for p in base.pieces if p.type == NORMAL]
    ceiling = max(base_normal_scores)
    floor = min(base_normal_scores + list(unigram_scores.values())) - MISSING_CHAR_SCORE_MARGIN

    out = model_pb2.ModelProto()
    out.CopyFrom(base)
    if tag:
        out.pieces.add(piece=tag, score=0.0, type=USER_DEFINED)
    for ch in chars:
        out.pieces.add(piece=ch, score=min(unigram_scores.get(ch, floor), ceiling), type=NORMAL)
    for score, piece in offered[:needed]:
        out.pieces.add(piece=piece, score=min(score, ceiling), type=NORMAL)
    assert len(out.pieces) == target_size
    processor_from_proto(out, out_path)  # sentencepiece accepts it before anything is written

    out_sha256 = write_model(out, out_path)
    record = ExtensionRecord(
        base_path=str(base_path), base_sha256=file_sha256(base_path), base_size=base_size,
        target_size=target_size, out_path=str(out_path), out_sha256=out_sha256,
        script_chars_added=len(chars), script_chars="".join(chars), lang_tag=tag,
        lang_tag_id=base_size if tag else None, unigram_pieces_added=needed, unigram_pieces_offered=len(offered),
        corpus_lines=len(lines), corpus_sources=corpus_sources, seed=seed, largest_size=largest,
        normalizer=normalizer_record(fold))
    out_path.with_suffix(".json").write_text(json.dumps(record.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
    return record


# ----------------------------------------------------------------------------- verification

@dataclass
class VerifyReport:
    lines: list[Check]

    @property
    def passed(self) -> bool:
        return all(line.passed for line in self.lines)

    @property
    def failed(self) -> list[str]:
        return [line.name for line in self.lines if not line.passed]

    def line(self, name: str) -> Check:
        return next(line for line in self.lines if line.name == name)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "lines": [asdict(line) for line in self.lines]}

    def to_text(self) -> str:
        return "\n".join(line.line() for line in self.lines)

    def to_markdown(self) -> str:
        """A table of cells cut to fit; the whole details are in details_markdown."""
        return table(["check", "result", "value", "detail"],
                     [[line.name, "PASS" if line.passed else "FAIL", line.value, line.reason] for line in self.lines])

    def details_markdown(self) -> str:
        return bullets([(line.name, f"{line.value}. {line.reason}" if line.reason else line.value)
                        for line in self.lines])


def piece_key(p) -> tuple:
    return (p.piece, p.type, p.score)


def check_base_pieces(candidate: model_pb2.ModelProto, base: model_pb2.ModelProto) -> Check:
    n = len(base.pieces)
    differ = [i for i in range(n) if i >= len(candidate.pieces) or piece_key(candidate.pieces[i]) != piece_key(base.pieces[i])]
    normalizer_same = candidate.normalizer_spec == base.normalizer_spec
    detail = f"first differing ids {differ[:5]}" if differ else ""
    if not normalizer_same:
        detail = (detail + "; " if detail else "") + "normalizer_spec differs from the base"
    return Check("base_pieces", not differ and normalizer_same, f"{len(differ)} of {n} base pieces differ", detail)


def special_ids(sp: spm.SentencePieceProcessor) -> str:
    return f"bos={sp.bos_id()} eos={sp.eos_id()} unk={sp.unk_id()} pad={sp.pad_id()}"


def check_special_ids(cand: model_pb2.ModelProto, base: model_pb2.ModelProto,
                      cand_sp: spm.SentencePieceProcessor, base_sp: spm.SentencePieceProcessor) -> Check:
    same = special_ids(cand_sp) == special_ids(base_sp) and all(
        i < len(cand.pieces) and piece_key(cand.pieces[i]) == piece_key(base.pieces[i]) for i in range(3))
    return Check("special_ids", same, special_ids(cand_sp), "" if same else f"base has {special_ids(base_sp)}")


def check_base_samples(cand_sp, base_sp, samples: list[str]) -> Check:
    differ = [s for s in samples if cand_sp.encode(s, out_type=int) != base_sp.encode(s, out_type=int)]
    return Check("base_samples", not differ, f"{len(differ)} of {len(samples)} samples tokenised differently",
                     f"first: {differ[0]!r}" if differ else "")


def check_scores(cand: model_pb2.ModelProto, base_size: int) -> Check:
    """Added NORMAL pieces must carry unigram log-probs: finite, <= 0, not integer BPE ranks. Their exp-sum is
    shown, not judged: sentencepiece's pruned unigram models on small corpora can exceed 1."""
    scores = [p.score for p in cand.pieces[base_size:] if p.type == NORMAL]
    if not scores:
        return Check("new_piece_scores", False, "no new NORMAL pieces", "")
    problems = []
    if not all(math.isfinite(s) for s in scores):
        problems.append("non-finite scores")
    positive = sum(s > 0 for s in scores)
    if positive:
        problems.append(f"{positive} scores > 0")
    integer = sum(float(s).is_integer() for s in scores)
    if len(scores) > 1 and integer == len(scores):
        problems.append("all scores are integers (BPE merge ranks, not log-probs)")
    finite = [s for s in scores if math.isfinite(s)]
    mass = sum(math.exp(min(s, 50.0)) for s in finite)
    value = f"{len(scores)} scores in [{min(finite, default=0):.3g}, {max(finite, default=0):.3g}], exp-sum {mass:.3g}"
    return Check("new_piece_scores", not problems, value, "; ".join(problems))


def check_vocab_size(size: int, config_text_tokens: int | None, checkpoint_text_rows: int | None) -> Check:
    if config_text_tokens is None and checkpoint_text_rows is None:
        return Check("vocab_size", True, f"{size} pieces; config and checkpoint skipped")
    parts, problems = [f"{size} pieces"], []
    if config_text_tokens is not None:
        parts.append(f"config number_text_tokens {config_text_tokens}")
        if config_text_tokens != size:
            problems.append(f"config says {config_text_tokens}, tokenizer has {size}")
    if checkpoint_text_rows is not None:
        parts.append(f"checkpoint text rows {checkpoint_text_rows}")
        if checkpoint_text_rows != size + 1:
            problems.append(f"checkpoint has {checkpoint_text_rows} text rows, need {size + 1} (N+1)")
    return Check("vocab_size", not problems, "; ".join(parts), "; ".join(problems))


def unk_chars(sp: spm.SentencePieceProcessor, lines: list[str]) -> Counter:
    """How often each character that encodes to <unk> occurs in lines (as the model's normaliser sees them)."""
    counts = Counter("".join(sp.normalize(line) for line in lines))
    return Counter({ch: n for ch, n in counts.items() if sp.unk_id() in sp.encode(ch, out_type=int)})


def describe_unk_chars(counts: Counter) -> str:
    """ "'/' U+002F Po x443, ..." for the characters behind the <unk>, most frequent first."""
    return "from " + ", ".join(f"{ch!r} U+{ord(ch):04X} {unicodedata.category(ch)} x{n}"
                               for ch, n in counts.most_common())


def verify_tokenizer(candidate_path: str | Path, base_path: str | Path, target_texts: list[str],
                     base_samples: list[str] | None = None, config_text_tokens: int | None = None,
                     checkpoint_text_rows: int | None = None, max_unused_share: float = 0.9,
                     script: str = "ethiopic") -> VerifyReport:
    """One pass/fail line per check of docs/design.md §2 for an extended tokenizer against its base."""
    cand, base = load_model_proto(candidate_path), load_model_proto(base_path)
    cand_sp, base_sp = processor_from_proto(cand, candidate_path), processor_from_proto(base, base_path)
    fold = recorded_fold(candidate_path)
    lines = [line for line in (normalize_text(t, fold=fold) for t in target_texts) if line]
    if not lines:
        raise FidelError(None, "target corpus is empty (no text after normalisation)")
    base_size = len(base.pieces)
    encoded = [cand_sp.encode(line, out_type=int) for line in lines]

    report = [
        check_base_pieces(cand, base),
        check_special_ids(cand, base, cand_sp, base_sp),
        check_base_samples(cand_sp, base_sp, list(base_samples or BASE_SAMPLES)),
    ]

    unk = cand_sp.unk_id()
    unk_count = sum(ids.count(unk) for ids in encoded)
    unk_lines = sum(unk in ids for ids in encoded)
    report.append(Check("target_unk", unk_count == 0, f"{unk_count} <unk> in {len(lines)} lines",
                            f"{unk_lines} lines have <unk>; {describe_unk_chars(unk_chars(cand_sp, lines))}"
                            if unk_count else ""))

    pieces = {p.piece: p.type for p in cand.pieces}
    seen = set().union(*(cand_sp.normalize(line) for line in lines + [script_letters(script)]))
    chars = sorted(ch for ch in seen if is_script_char(ch, script))  # every letter, seen in the corpus or not
    missing = [ch for ch in chars if pieces.get(ch) not in (NORMAL, USER_DEFINED)]
    report.append(Check("script_coverage", not missing, f"{len(missing)} of {len(chars)} {script} chars missing",
                            f"missing: {''.join(missing[:20])}" if missing else ""))

    failures = [line for line, ids in zip(lines, encoded, strict=True) if cand_sp.decode(ids) != line]
    report.append(Check("round_trip", not failures, f"{len(failures)} of {len(lines)} lines fail",
                            f"first: {failures[0]!r}" if failures else ""))

    words = sum(len(line.split()) for line in lines)
    per_word = sum(map(len, encoded)) / words
    report.append(Check("tokens_per_word", per_word <= MAX_TOKENS_PER_WORD, f"{per_word:.2f}",
                            f"above {MAX_TOKENS_PER_WORD}" if per_word > MAX_TOKENS_PER_WORD else ""))

    # the script's letters are pieces whether the text has them or not (coverage, above): unused counts the rest
    letters = set(script_letters())
    new_ids = {i for i in range(base_size, len(cand.pieces))
               if cand.pieces[i].type == NORMAL and cand.pieces[i].piece not in letters}
    used = {i for ids in encoded for i in ids}
    unused = len(new_ids - used)
    share = unused / len(new_ids) if new_ids else 1.0
    report.append(Check("unused_new_pieces", share <= max_unused_share,
                            f"{share:.1%} ({unused} of {len(new_ids)}) never used",
                            f"above {max_unused_share:.0%}" if share > max_unused_share else ""))

    report.append(check_vocab_size(len(cand.pieces), config_text_tokens, checkpoint_text_rows))
    report.append(check_scores(cand, base_size))
    report.append(Check("sha256", True, file_sha256(candidate_path)))
    return VerifyReport(report)
