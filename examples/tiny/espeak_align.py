"""Frame-level phone alignments of espeak-ng's own speech, from its synthesiser's phoneme events.

espeak-ng's C library (``libespeak-ng.so``) reports, while it synthesises, an event at the start
of every phoneme with its position in the audio it generates (``espeakEVENT_PHONEME``, enabled by
``espeakINITIALIZE_PHONEME_EVENTS``; ``espeak_EVENT.sample`` counts samples of its output).  This
module reaches it through ``ctypes`` (the structures of espeak-ng's ``speak_lib.h``), speaks the
text with the same voice, speed and pitch as the ``espeak-ng -w`` command line, and checks that
the library's audio is the command's, sample for sample; the events then time the phones of that
very audio.  Each utterance is spoken by a fresh process (``python espeak_align.py ...``, as
:func:`phone_events` runs it): the library keeps state from one synthesis to the next (measured
here: in one process, utterances spoken after others came out different from the command's
audio; in fresh processes all 147 utterances tried matched it), and the command line starts
fresh every time.  These are the synthesiser's own phone boundaries, not a forced alignment:
they are exact for the audio espeak-ng made (each phone starts where the synthesiser started
it), and phones carry espeak-ng's names, those of ``espeak-ng -x``.  Pauses (``_``, ``_:``, ...)
and the frames before the first phone are silence.

``mbrola`` voices would be needed for ``espeak-ng --pho`` (phone durations on stdout); the events
need none.
"""

import argparse
import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
import threading
import wave
from typing import List, Sequence, Tuple

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_PHONEME_EVENTS = 0x0001
EVENT_LIST_TERMINATED = 0
EVENT_PHONEME = 7
POS_CHARACTER = 1
CHARS_AUTO, PHONEMES, ENDPAUSE = 0, 0x100, 0x1000  # the flags espeak-ng's command line passes
RATE, PITCH = 1, 3
SILENCE = "sil"


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


class _Voice(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class Espeak:
    """espeak-ng's library in synchronous mode with phoneme events; one synthesis at a time (a lock).

    Raises:
        OSError: ``libespeak-ng.so`` not found (``apt-get install espeak-ng`` installs it).
    """

    def __init__(self):
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        self.lib = ctypes.CDLL(name)
        self.sample_rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, None, INITIALIZE_PHONEME_EVENTS)
        if self.sample_rate <= 0:
            raise OSError(f"{name}: espeak_Initialize failed ({self.sample_rate})")
        self._lock = threading.Lock()
        self._samples: List[np.ndarray] = []
        self._events: List[Tuple[int, str]] = []
        self._callback = _Callback(self._on_audio)  # kept alive as long as the library may call it
        self.lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav, n, events) -> int:
        if wav and n > 0:
            self._samples.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != EVENT_LIST_TERMINATED:
            if events[i].type == EVENT_PHONEME:
                self._events.append((int(events[i].sample), events[i].id.string.decode("utf-8", "replace")))
            i += 1
        return 0

    def speak(self, text: str, voice: str, speed: int, pitch: int) -> Tuple[np.ndarray, List[Tuple[int, str]]]:
        """Synthesise as ``espeak-ng -v voice -s speed -p pitch -w out.wav text`` does.

        Returns:
            ``(samples, events)``: int16 audio at :attr:`sample_rate`, and ``(sample, phone)`` for
            every phoneme event, in order (pauses included, named ``_``, ``_:`` ...).
        """
        with self._lock:
            self._samples, self._events = [], []
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                # as the command line: a name that is no voice file is taken as a language ("en-gb+m3")
                select = _Voice(languages=voice.encode())
                if self.lib.espeak_SetVoiceByProperties(ctypes.byref(select)) != 0:
                    raise ValueError(f"espeak-ng has no voice {voice!r}")
            self.lib.espeak_SetParameter(RATE, int(speed), 0)
            self.lib.espeak_SetParameter(PITCH, int(pitch), 0)
            data = text.encode("utf-8") + b"\0"
            err = self.lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, CHARS_AUTO | PHONEMES | ENDPAUSE,
                                        None, None)
            if err != 0:
                raise RuntimeError(f"espeak_Synth failed ({err}) on {text!r}")
            self.lib.espeak_Synchronize()
            audio = np.concatenate(self._samples) if self._samples else np.zeros(0, np.int16)
            return audio.astype(np.int16), list(self._events)


def is_pause(phone: str) -> bool:
    """espeak-ng's pause phonemes (``_``, ``_:``, ``_!`` ...)."""
    return phone.startswith("_")


def frame_phones(events: Sequence[Tuple[int, str]], event_rate: int, offset_s: float, num_samples: int,
                 sample_rate: int, frame_rate: float = 100.0) -> List[str]:
    """One phone per frame of the final audio, from the phoneme events.

    Phone ``i`` spans ``[start_i, start_{i+1})`` (the last one to the end); a frame takes the
    phone at its centre ``(u + 0.5) / frame_rate``; pauses and the time before the first event
    are :data:`SILENCE`.

    Args:
        events: ``(sample, phone)`` at ``event_rate`` in espeak-ng's own audio.
        offset_s: where espeak-ng's sample 0 lies in the final audio, in seconds (negative when
            its start was trimmed).
        num_samples / sample_rate: the final audio.
        frame_rate: frames per second.

    Returns:
        ``floor(num_samples / sample_rate * frame_rate)`` phone symbols.
    """
    n = int(np.floor(num_samples / sample_rate * frame_rate + 1e-9))
    starts = np.array([s / event_rate + offset_s for s, _ in events], dtype=np.float64)
    centres = (np.arange(n) + 0.5) / frame_rate
    which = np.searchsorted(starts, centres, side="right") - 1  # last phone started at or before the centre
    out = []
    for w in which:
        out.append(SILENCE if w < 0 or is_pause(events[w][1]) else events[w][1])
    return out


def read_wav_int16(path: str) -> Tuple[np.ndarray, int]:
    """``(samples, rate)`` of a 16-bit mono wav."""
    with wave.open(path) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono, found {8 * w.getsampwidth()}-bit, "
                             f"{w.getnchannels()} channels")
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16), w.getframerate()


def phone_events(text: str, voice: str, speed: int, pitch: int, wav: str) -> Tuple[List[Tuple[int, str]], int]:
    """The phoneme events of ``espeak-ng -v voice -s speed -p pitch -w wav text``'s audio, by a fresh process.

    Returns:
        ``([(sample, phone), ...], sample_rate)``.

    Raises:
        RuntimeError: the library's audio is not ``wav``'s (then its events would not time it).
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--voice", voice, "--speed", str(speed), "--pitch", str(pitch),
           "--wav", wav, text]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or f"{cmd}: exit status {out.returncode}")
    result = json.loads(out.stdout)
    return [(int(s), str(p)) for s, p in result["events"]], int(result["sample_rate"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Print the phoneme events of espeak-ng's speech of TEXT as JSON, after "
                                            "checking that it is the audio of --wav (written by espeak-ng -w).")
    p.add_argument("--voice", required=True)
    p.add_argument("--speed", type=int, required=True)
    p.add_argument("--pitch", type=int, required=True)
    p.add_argument("--wav", required=True, help="what 'espeak-ng -v VOICE -s SPEED -p PITCH -w WAV TEXT' wrote")
    p.add_argument("text")
    a = p.parse_args(argv)
    engine = Espeak()
    audio, events = engine.speak(a.text, a.voice, a.speed, a.pitch)
    ref, rate = read_wav_int16(a.wav)
    if rate != engine.sample_rate or not np.array_equal(audio, ref):
        print(f"espeak_align: {a.wav}: the library's speech ({len(audio)} samples at {engine.sample_rate} Hz) is not "
              f"this file's ({len(ref)} at {rate} Hz): its phoneme events would not time it", file=sys.stderr)
        return 1
    json.dump({"sample_rate": engine.sample_rate, "events": events}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
