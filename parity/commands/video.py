"""``parity video REF OURS``: compare two videos frame by frame and at chunk seams; write video.json and video.html."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from parity import video, video_page
from parity.commands import add, positive_int
from parity.dumps import writable_folder
from parity.vocab import EXIT_FAIL, EXIT_PASS, fmt


def frame_list(text: str) -> list[int]:
    """``"1,5,9"`` -> ``[1, 5, 9]``: whole, non-negative frame numbers."""
    try:
        frames = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected frame numbers separated by commas (1,5,9), got {text!r}") from None
    if not frames or min(frames) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative frame numbers separated by commas (1,5,9), got {text!r}")
    return frames


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What the terminal shows: verdict, what was compared, the chunks, then one line per finding."""
    s = result["summary"]
    seams = result["seams"]
    lines = [f"{result['verdict']}: ours {result['inputs']['ours']['path']} vs reference {result['inputs']['ref']['path']}, "
             f"{result['frames']} frames of {result['width']}x{result['height']} px",
             f"  seams (first frame of each chunk): {', '.join(map(str, seams))}" if seams else
             "  no chunk seams given (--chunk-frames N or --boundaries F,F,...): seams not checked",
             f"  PSNR min {'inf (identical frames)' if s['psnr_db_min'] is None else fmt(s['psnr_db_min'], 'db')} dB, "
             f"SSIM min {fmt(s['ssim_min'])}"]
    findings = result["findings"]
    if findings:
        lines.append(f"  {len(findings)} finding{'' if len(findings) == 1 else 's'}:")
        lines += [f"    {f['kind']}: {f['message']}" for f in findings]
    return lines


def run(args: argparse.Namespace) -> int:
    out = writable_folder(args.out, "--out")
    ref, ours = video.load(args.ref), video.load(args.ours)
    result = video.analyse(ref, ours, chunk_frames=args.chunk_frames, boundaries=args.boundaries)
    out.mkdir(parents=True, exist_ok=True)
    data = video.write_result(out, result)
    page = video_page.write_page(result, out, ref, ours)
    print("\n".join(summary_lines(result)))
    print(f"JSON: {data}\nHTML: {page}")
    return EXIT_PASS if result["verdict"] == "PASS" else EXIT_FAIL


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(sub, common, "video", "compare two videos (files or .npy frame stacks) frame by frame and at chunk seams",
            epilog="exit codes: 0 no finding, 1 findings, 2 usage or input error (a file missing, unreadable or not "
                   "matching the other), 3 internal error (a bug: please report it with the traceback)",
            description="Compare OURS with the reference video REF: per frame PSNR, SSIM, sharpness, brightness, "
                        "contrast, colour and 8 px patterns, and brightness / colour / contrast steps and frame "
                        "differences at chunk seams, each judged against stated limits. Writes video.json and a "
                        "self-contained video.html to --out. Inputs: any video OpenCV reads (.mp4, .avi, .mkv, ...) "
                        "or a .npy stack: (T, H, W, C) uint8 or float on [0, 1] / [-1, 1], or (1, C, T, H, W) on "
                        "[-1, 1] like a decoder component's ref/frames.npy and mlx/frames.npy dumps.")
    p.add_argument("ref", type=Path, metavar="REF", help="the reference video (e.g. the PyTorch pipeline's output)")
    p.add_argument("ours", type=Path, metavar="OURS", help="our video (e.g. the MLX port's output)")
    chunks = p.add_mutually_exclusive_group()
    chunks.add_argument("--chunk-frames", type=positive_int, metavar="N",
                        help="the video was generated or decoded in chunks of N frames (seams at N, 2N, ...)")
    chunks.add_argument("--boundaries", type=frame_list, metavar="F,F,...",
                        help="first frame of each chunk, e.g. 1,5,9 for the Wan VAE decoder (1 frame, then 4 per chunk)")
    p.add_argument("--out", type=Path, default=Path("reports/video"), metavar="DIR",
                   help="folder for video.json and video.html (default reports/video; files there are replaced)")
    p.set_defaults(func=run)

