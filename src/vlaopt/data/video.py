"""MP4 videos of uint8 RGB frames, written and read with PyAV, for LeRobot v3 datasets.

A file holds the frames of many episodes back to back at a constant rate: frame i is shown at i / fps
seconds, which is how LeRobot finds an episode's frames (its from/to timestamps). The encoding is lossy:
LeRobot's default settings (AV1 by SVT-AV1, yuv420p with 4:2:0 chroma, crf 30, a keyframe every 2 frames).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

try:
    import av
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(f"LeRobot videos need PyAV: pip install 'vla-opt[lerobot]' ({error})") from error

from vlaopt.data.episodes import EpisodeFormatError


@dataclass(frozen=True)
class VideoCodec:
    """Encoder settings; `info` gives the `video.*` entries LeRobot records per video feature in info.json."""

    codec: str = "libsvtav1"
    pix_fmt: str = "yuv420p"
    crf: int = 30
    g: int = 2
    preset: int = 12

    def __post_init__(self) -> None:
        if self.codec not in av.codecs_available:
            raise ValueError(f"video codec {self.codec!r} is not in this PyAV build; e.g. libsvtav1 or libx264")

    def info(self, height: int, width: int, fps: int) -> dict[str, Any]:
        return {
            "video.height": height,
            "video.width": width,
            "video.codec": av.codec.Codec(self.codec, "w").canonical_name,
            "video.pix_fmt": self.pix_fmt,
            "video.fps": fps,
            "video.channels": 3,
            "video.g": self.g,
            "video.crf": self.crf,
            "video.preset": self.preset,
            "video.fast_decode": 0,
            "video.video_backend": "pyav",
            "video.extra_options": {},
            "is_depth_map": False,
            "has_audio": False,
        }


class VideoWriter:
    """Append (N, H, W, 3) uint8 frames to a new mp4 file; `frames` counts the frames written so far."""

    def __init__(self, path: str | Path, fps: int, height: int, width: int, codec: VideoCodec) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"{codec.pix_fmt} video needs an even image height and width, got {height}x{width}")
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration per file otherwise
        self._shape = (height, width, 3)
        self._container = av.open(str(path), "w", format="mp4")  # the path is a temporary name without .mp4
        options = {"crf": str(codec.crf), "g": str(codec.g)}
        if codec.codec == "libsvtav1":
            options["preset"] = str(codec.preset)
        self._stream = self._container.add_stream(codec.codec, rate=fps, options=options)
        self._stream.height, self._stream.width, self._stream.pix_fmt = height, width, codec.pix_fmt
        self.frames = 0

    def write(self, frames: np.ndarray) -> None:
        if frames.dtype != np.uint8 or frames.shape[1:] != self._shape:
            raise ValueError(f"frames must be uint8 (N, {', '.join(map(str, self._shape))}), "
                             f"got {frames.dtype} {frames.shape}")
        for frame in frames:
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        self.frames += len(frames)

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        self._container.mux(self._stream.encode())
        self._container.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:
            self._container.close()


class VideoReader:
    """Frames of an mp4 by frame index (presentation time x fps), decoded forward; asking for an earlier
    frame than the last one read decodes again from the start."""

    def __init__(self, path: str | Path, fps: int) -> None:
        self.path, self.fps = Path(path), fps
        self._container: Any = None
        self._decoded: Any = None
        self._next = 0

    def _frames(self) -> Any:
        if self._container is None:
            try:
                self._container = av.open(str(self.path))
            except (OSError, av.error.FFmpegError) as error:
                raise EpisodeFormatError(f"video {self.path} cannot be opened ({error})") from error
            self._decoded = self._container.decode(video=0)
        return self._decoded

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames start .. stop-1 as uint8 (stop - start, H, W, 3)."""
        if start < self._next:
            self.close()
            self._next = 0
        frames = []
        for frame in self._frames():
            index = round(float(frame.time) * self.fps)
            self._next = index + 1
            if index >= start:
                if index != start + len(frames):
                    raise EpisodeFormatError(f"video {self.path} has no frame {start + len(frames)} "
                                             f"(the next frame shows at {float(frame.time):.4f} s, fps {self.fps})")
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == stop - start:
                    return np.stack(frames)
        raise EpisodeFormatError(f"video {self.path} ends before frame {stop - 1} (fps {self.fps})")

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
