"""Speech synthesis for the demo data: the voices (espeak-ng and flite, with accents, speeds and
pitches) and speaking captions into 16 kHz mono WAV files, in a thread pool."""
from __future__ import annotations

import shutil
import subprocess
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

SAMPLE_RATE = 16_000


class Utterance(Protocol):
    """What to speak: `text` in `voice`, into the WAV file `path` (relative to the output folder)."""

    voice: "Voice"
    text: str
    path: str


@dataclass(frozen=True)
class Voice:
    """One way of speaking a caption: (engine, voice, speed, pitch).

    Attributes:
        engine: ``"espeak"`` (espeak-ng), ``"flite"`` or ``"festival"``.
        name: espeak-ng ``accent+variant`` (``"en-gb-scotland+f3"``), a flite voice (``"slt"``) or
            a festival voice (``"ked_diphone"``, ``"cmu_us_slt_arctic_hts"``).
        speed: espeak-ng words per minute (``-s``), or flite's / festival's duration stretch
            (>1 = slower).
        pitch: espeak-ng pitch 0-99 (``-p``), or flite's target mean f0 in Hz (``None``: the
            voice's own; flite's ``rms`` and ``kal`` voices ignore it; festival: always None).
    """

    engine: str
    name: str
    speed: float
    pitch: int | None

    @property
    def id(self) -> str:
        """Stable identifier, e.g. ``espeak:en-us+m3:s175:p50`` or ``flite:slt:x1.15:f210``."""
        if self.engine == "espeak":
            return f"espeak:{self.name}:s{int(self.speed)}:p{self.pitch}"
        pitch = "" if self.pitch is None else f":f{self.pitch}"
        return f"{self.engine}:{self.name}:x{self.speed:.2f}{pitch}"

    @property
    def slug(self) -> str:
        """File-name-safe form of :attr:`id`."""
        return self.id.replace(":", "_").replace("+", "_")

    def command(self, text: str, out: str) -> list[str]:
        """The command line that speaks ``text`` into the WAV file ``out``."""
        if self.engine == "espeak":
            return ["espeak-ng", "-v", self.name, "-s", str(int(self.speed)),
                    "-p", str(self.pitch), "-w", out, text]
        if self.engine == "flite":
            cmd = ["flite", "-voice", self.name, "--setf", f"duration_stretch={self.speed:.2f}"]
            if self.pitch is not None:
                cmd += ["--setf", f"int_f0_target_mean={self.pitch}"]
            return [*cmd, "-t", text, "-o", out]
        if self.engine == "festival":  # text2wave reads the text from stdin (see `stdin`)
            return ["text2wave", "-eval", f"(voice_{self.name})",
                    "-eval", f"(Parameter.set 'Duration_Stretch {self.speed:.2f})", "-o", out]
        raise ValueError(f"unknown engine {self.engine!r}")

    def stdin(self, text: str) -> bytes | None:
        """What the command reads on stdin (festival's text), or None."""
        return text.encode() if self.engine == "festival" else None


# espeak-ng's English accents and the plain male/female variants. The named variants are left
# out: a few (Demonic, shelby, RicishayMax) were nearly unintelligible in the prototype, and the
# plain ones are already 11 distinct timbres. MBROLA voices are not installed on Debian by default.
ESPEAK_ACCENTS: tuple[str, ...] = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
ESPEAK_VARIANTS: tuple[str, ...] = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3")  # klatt*: espeak-ng's Klatt formant synthesiser, another sound
ESPEAK_SPEEDS: tuple[int, ...] = (135, 155, 175, 195)  # words per minute; espeak's default is 175
ESPEAK_PITCHES: tuple[int, ...] = (35, 50, 65)  # 0-99; default 50
# (voice, duration stretch, f0 target or None, held out). Two prosodies per flite speaker. The
# female US voice slt is held out (both prosodies), so the test set measures a new speaker of a
# known engine; kal16, awb, rms and kal stay in training so flite's sound is not entirely unseen.
FLITE_VOICES: tuple[tuple[str, float, int | None, bool], ...] = (
    ("kal16", 1.0, None, False), ("kal16", 1.2, 120, False),
    ("awb", 1.0, None, False), ("awb", 0.9, 120, False),
    ("rms", 1.0, None, False), ("rms", 1.2, None, False),
    ("kal", 1.0, None, False), ("kal", 1.15, None, False),
    ("slt", 1.0, None, True), ("slt", 1.15, 210, True),
)


# A third engine, never heard in training: the test of "a voice you never trained on" at the level
# of the synthesiser. festival's diphone voice ked (a speaker neither espeak-ng nor flite has) and its
# HTS statistical-parametric slt (flite's slt is a held-out voice too, so no training clip is slt).
# festival's kal_diphone is left out: flite's kal voices are built from the same diphone recordings.
FESTIVAL_VOICES: tuple[tuple[str, float], ...] = (
    ("ked_diphone", 0.9), ("ked_diphone", 1.0), ("ked_diphone", 1.2),
    ("cmu_us_slt_arctic_hts", 1.0), ("cmu_us_slt_arctic_hts", 1.2))
#: Voices of the held-out engine (festival), used only for the held-out-engine test clips.
HELDOUT_ENGINE_VOICES: tuple[Voice, ...] = tuple(Voice("festival", name, stretch, None)
                                                 for name, stretch in FESTIVAL_VOICES)


def _fixed_voices() -> tuple[tuple[Voice, ...], tuple[Voice, ...]]:
    """The fixed voice list, split into (train, held-out); independent of any seed."""
    train: list[Voice] = []
    heldout: list[Voice] = []
    for a, accent in enumerate(ESPEAK_ACCENTS):
        for v, variant in enumerate(ESPEAK_VARIANTS):
            # speed and pitch cycle with different strides so they are not tied to accent/variant
            voice = Voice("espeak", f"{accent}+{variant}",
                          ESPEAK_SPEEDS[(a + 3 * v) % len(ESPEAK_SPEEDS)],
                          ESPEAK_PITCHES[(a + v) % len(ESPEAK_PITCHES)])
            # A diagonal pattern holds out 23 of the 112 (~21 %): every accent keeps 12-13 variants
            # in training and every variant stays in training in >= 5 accents, so a held-out voice
            # is an unheard combination (accent x timbre x speed x pitch), not an unheard accent.
            (heldout if (v - 2 * a) % 5 == 0 else train).append(voice)
    for name, stretch, f0, held in FLITE_VOICES:
        (heldout if held else train).append(Voice("flite", name, stretch, f0))
    return tuple(train), tuple(heldout)


#: Voices used for training clips (espeak-ng and flite).
#: Voices only used for the held-out-voice test clips (espeak-ng + flite slt at two prosodies).
TRAIN_VOICES, HELDOUT_VOICES = _fixed_voices()


def pick_voices(voices: Sequence[Voice], n: int | None, rng: np.random.Generator) -> list[Voice]:
    """``n`` of ``voices`` (all when None), alternating engines so a small subset has both."""
    if n is None or n >= len(voices):
        return list(voices)
    queues = []
    for engine in dict.fromkeys(v.engine for v in voices):  # the engines present, in order
        pool = [v for v in voices if v.engine == engine]
        queues.append([pool[i] for i in rng.permutation(len(pool))])
    picked: list[Voice] = []
    while len(picked) < n:
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return [v for v in voices if v in picked]  # canonical order


def finish_wave(wave: np.ndarray, rate: int) -> np.ndarray:
    """Mono float32 at 16 kHz, leading/trailing silence trimmed to 0.1 s, peak 0.9."""
    import soxr

    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if rate != SAMPLE_RATE:
        wave = soxr.resample(wave, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    peak = float(np.abs(wave).max(initial=0.0))
    if peak < 1e-3:
        raise RuntimeError("the synthesiser produced silence")
    loud = np.flatnonzero(np.abs(wave) > 0.02 * peak)
    margin = SAMPLE_RATE // 10  # keep a little silence: onsets/decays are part of the speech
    wave = wave[max(0, loud[0] - margin): loud[-1] + margin + 1]
    # Engines differ in level (flite is louder than espeak-ng); equal peaks remove that shortcut.
    return wave * (0.9 / peak)


def speak(clip: Utterance, folder: Path, tmp: Path) -> float:
    """Synthesise one clip into ``folder / clip.path``; returns its duration in seconds."""
    import soundfile as sf

    raw = tmp / f"{uuid.uuid4().hex}.wav"
    cmd = clip.voice.command(clip.text, str(raw))
    try:
        # the subprocess releases the GIL, so a thread pool keeps every core busy
        text = clip.voice.stdin(clip.text)
        result = subprocess.run(cmd, input=text, stdin=None if text is not None else subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120, check=False)
        if result.returncode != 0 or not raw.is_file():
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {result.returncode}): "
                               f"{result.stderr.decode(errors='replace').strip()}")
        wave, rate = sf.read(str(raw), dtype="float32", always_2d=False)
        try:
            wave = finish_wave(wave, rate)
        except RuntimeError as exc:
            raise RuntimeError(f"`{' '.join(cmd)}`: {exc}") from exc
    finally:
        raw.unlink(missing_ok=True)
    out = folder / clip.path
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), wave, SAMPLE_RATE, subtype="PCM_16")
    return len(wave) / SAMPLE_RATE


def speak_all(clips: Sequence[Utterance], folder: Path, workers: int, progress: bool) -> float:
    """Speak every clip in a thread pool with a progress bar; returns the total seconds."""
    from tqdm import tqdm

    tmp = folder / "_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    total = 0.0
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
            total=len(clips), desc="speaking captions", unit="clip", disable=not progress) as bar:
        pending = {pool.submit(speak, clip, folder, tmp) for clip in clips}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    for other in pending:  # stop early rather than speak thousands more clips
                        other.cancel()
                    raise future.exception()  # type: ignore[misc]
                total += future.result()
            bar.update(len(done))
    shutil.rmtree(tmp, ignore_errors=True)
    return total
