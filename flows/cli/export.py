"""`fidel export`: an upstream-loadable gpt.pth, tokenizer and config from a checkpoint."""

from __future__ import annotations

import json


def add_commands(sub) -> None:
    export = sub.add_parser("export", help="write an upstream-loadable gpt.pth, tokenizer and config")
    export.add_argument("checkpoint")
    export.add_argument("--out", required=True)
    export.add_argument("--fp16", action="store_true", help="write float16 tensors (half the size)")
    export.add_argument("--base-checkpoint", default=None,
                        help="the base gpt.pth, if it moved since training (its base rows must hash the same)")
    export.add_argument("--release", default=None,
                        help="the official IndexTTS2 folder: its other files join the export, which becomes a "
                             "complete model folder (the release is only read)")
    export.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from fidel_tts.trainer.checkpoints.export import export_model

    exported = export_model(args.checkpoint, args.out, fp16=args.fp16, base_checkpoint=args.base_checkpoint,
                            release=args.release)
    print(json.dumps(exported.record, indent=2))
    return 0
