"""`fidel speak`: hear an exported model folder through IndexTTS2's own inference, with fidel's text front end."""

from __future__ import annotations

import sys
from pathlib import Path

from fidel_tts.trainer.errors import EXIT_BAD_INPUT, FidelError

EMOTIONS = ("happy", "angry", "sad", "afraid", "disgusted", "melancholic", "surprised", "calm")


def add_commands(sub) -> None:
    speak = sub.add_parser("speak", help="synthesise a wav from an exported model folder (IndexTTS2's inference)")
    speak.add_argument("--model", required=True, help="the folder `fidel export --release` wrote")
    texts = speak.add_mutually_exclusive_group(required=True)
    texts.add_argument("--text", help="the text to speak")
    texts.add_argument("--texts", help="a UTF-8 file, one text a line: OUT_1.wav, OUT_2.wav … beside --out")
    speak.add_argument("--prompt", required=True, help="the voice to speak in (a wav)")
    speak.add_argument("--out", required=True, help="the wav to write (never overwritten)")
    speak.add_argument("--device", default="cpu", help="cpu, cuda:0 … (default cpu)")
    speak.add_argument("--seed", type=int, default=0, help="seeds the sampling of each text (default 0)")
    speak.add_argument("--emo-prompt", default=None, help="a wav whose emotion to speak with (upstream emo_audio_prompt)")
    speak.add_argument("--emo-alpha", type=float, default=1.0, help="how strongly (upstream emo_alpha, 0..1)")
    speak.add_argument("--emo-vector", default=None,
                       help=f"eight weights, comma-separated, for {','.join(EMOTIONS)} (upstream emo_vector)")
    speak.add_argument("--emo-text", default=None, help="describe the emotion in words (upstream's Qwen emotion)")
    speak.add_argument("--emo-random", action="store_true", help="upstream use_random")
    speak.add_argument("--interval-silence", type=int, default=200, help="ms of silence between segments")
    speak.add_argument("--max-mel-tokens", type=int, default=1500, help="upstream's cap on codes per segment")
    speak.set_defaults(func=cmd_speak)


def read_texts(args) -> list[str]:
    if args.text is not None:
        return [args.text]
    path = Path(args.texts)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise FidelError(path, f"--texts not readable as UTF-8 text ({exc.__class__.__name__})") from None
    if not any(lines):
        raise FidelError(path, "--texts holds no text")
    return [line for line in lines if line]


def out_paths(out: Path, count: int) -> list[Path]:
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{n}{out.suffix}") for n in range(1, count + 1)]


def emotion_keywords(args) -> dict:
    if args.max_mel_tokens < 1 or not 0 <= args.emo_alpha <= 1:
        raise FidelError(None, "--max-mel-tokens must be >= 1 and --emo-alpha within 0..1")
    keywords = {"emo_alpha": args.emo_alpha, "use_random": args.emo_random, "interval_silence": args.interval_silence,
                "max_mel_tokens": args.max_mel_tokens}
    if args.emo_prompt:
        if not Path(args.emo_prompt).is_file():
            raise FidelError(args.emo_prompt, "--emo-prompt not found")
        keywords["emo_audio_prompt"] = args.emo_prompt
    if args.emo_vector:
        keywords["emo_vector"] = emotion_vector(args.emo_vector)
    if args.emo_text:
        keywords.update(use_emo_text=True, emo_text=args.emo_text)
    return keywords


def emotion_vector(text: str) -> list[float]:
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise FidelError(None, f"--emo-vector {text!r}: not comma-separated numbers") from None
    if len(weights) != len(EMOTIONS) or min(weights) < 0:
        raise FidelError(None, f"--emo-vector: eight weights >= 0 for {','.join(EMOTIONS)}, got {text!r}")
    return weights


def cmd_speak(args) -> int:
    from fidel_tts.trainer.evaluation.speak import SpeakSettings, check_model, load_tts, speak

    texts = read_texts(args)
    settings = SpeakSettings(Path(args.model), Path(args.prompt), texts, out_paths(Path(args.out), len(texts)),
                             args.device, args.seed, emotion_keywords(args))
    problems = check_model(settings)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return EXIT_BAD_INPUT
    for wav, seconds in speak(load_tts(settings.model, settings.device), settings):
        print(f"wrote {wav} ({seconds:.2f} s)")
    return 0
