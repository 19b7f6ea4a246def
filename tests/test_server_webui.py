"""The WebUI in a real browser (Debian's /usr/bin/chromium, headless, fake microphone) against a real
`python -m server` on the tiny random model: voices (upload, record, play, delete), synthesis in each mode
with streaming playback, downloads in each format, stop, and the API's own error text.

Skipped only when /usr/bin/chromium is absent and COSYSERVE_REQUIRE_BROWSER is unset (CI sets it: there a
missing browser fails the run). COSYSERVE_SCREENSHOT=<path> writes a screenshot after a successful run
(how docs/webui.png is made); nothing else is written outside pytest's temporary folders.
"""
from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf

from bench.servers import SpawnedServer, spawn_server
from tests.server_helpers import wav_bytes

CHROMIUM = Path("/usr/bin/chromium")
REQUIRED = bool(os.environ.get("COSYSERVE_REQUIRE_BROWSER"))
if not CHROMIUM.exists() and not REQUIRED:
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium; CI sets COSYSERVE_REQUIRE_BROWSER=1 so this "
                "fails there instead)", allow_module_level=True)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # after the skip

CHROMIUM_ARGS = [
    "--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    # the network is closed here: without these Chromium keeps dialling out and logging refusals
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
]
SHORT_TEXT = "Hi there."  # the tiny random model says a few seconds of noise for it
TIMEOUT_MS = 30_000
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def server() -> Iterator[SpawnedServer]:
    with spawn_server(extra=["--warmup", "0"], startup_timeout_s=120) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, server: SpawnedServer) -> Iterator[Page]:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.on("dialog", lambda dialog: dialog.accept())  # the delete confirmation
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{server.url}/")
    page.get_by_test_id("token").fill(server.token)
    # typing the token lists the voices (debounced): wait for it, or it would clear a later error line
    expect(page.get_by_test_id("voice-info")).to_have_text(re.compile(r"^\d+ voices?$"))
    yield page
    context.close()
    assert not page_errors, page_errors  # no uncaught exception in the page's scripts


def _upload_file(page: Page, tmp_path: Path, seconds: float = 2.0, text: str = "A short test tone.") -> None:
    before = _voice_count(page)
    path = tmp_path / "prompt.wav"
    path.write_bytes(wav_bytes(seconds, 16000))
    page.get_by_test_id("voice-upload-file").set_input_files(str(path))
    page.get_by_test_id("voice-upload-text").fill(text)
    page.get_by_test_id("voice-upload-submit").click()
    expect(page.get_by_test_id("voice-info")).to_have_text(f"{before + 1} voice{'' if before == 0 else 's'}")


def _voice_count(page: Page) -> int:
    page.get_by_test_id("voice-refresh").click()
    expect(page.get_by_test_id("voice-info")).to_have_text(re.compile(r"^\d+ voices?$"))
    return int(page.get_by_test_id("voice-info").text_content().split()[0])


def _speak(page: Page, mode: str, fmt: str, instruct: str = "") -> None:
    page.get_by_test_id("text").fill(SHORT_TEXT)
    page.get_by_test_id("mode").select_option(mode)
    if instruct:
        page.get_by_test_id("instruct").fill(instruct)
    page.get_by_test_id("format").select_option(fmt)
    page.get_by_test_id("speed").fill("2")  # half the time to listen to
    page.evaluate(_RECORD_STATES)
    page.get_by_test_id("speak").click()


# Every text the player's state shows, in order: a short random-weight clip can be "playing" for less than
# expect()'s polling interval, so whether it played is read from the record, not polled.
_RECORD_STATES = """() => {
  window.__states = [];
  if (window.__stateObserver) return;
  const el = document.querySelector('[data-testid="player-state"]');
  window.__stateObserver = new MutationObserver(() => window.__states.push(el.textContent.trim()));
  window.__stateObserver.observe(el, {childList: true, characterData: true, subtree: true});
}"""


def _played_to_the_end(page: Page) -> None:
    """The player went through "playing" (audio started while it was generated) and reached "ended"."""
    expect(page.get_by_test_id("player-state")).to_have_text("ended")
    states = page.evaluate("() => window.__states")
    assert "playing" in states, states


def _download(page: Page) -> bytes:
    link = page.get_by_test_id("download")
    expect(link).to_have_attribute("aria-disabled", "false")
    with page.expect_download() as info:
        link.click()
    return Path(info.value.path()).read_bytes()


def _shown_seconds(page: Page) -> float:
    return float(page.get_by_test_id("audio-seconds").text_content())


def test_upload_speak_each_mode_and_download(page: Page, tmp_path: Path) -> None:
    _upload_file(page, tmp_path)

    # zero-shot, wav: plays while it is generated, to the end
    _speak(page, "fast_replication", "wav")
    _played_to_the_end(page)
    assert int(page.get_by_test_id("ttfp-ms").text_content()) > 0
    assert float(page.get_by_test_id("rtf").text_content()) > 0
    assert int(page.get_by_test_id("chunks").text_content()) >= 1
    assert page.get_by_test_id("stop").is_disabled()
    audio, rate = sf.read(io.BytesIO(_download(page)), dtype="int16")
    assert rate == 24000 and abs(len(audio) / rate - _shown_seconds(page)) < 0.01
    if os.environ.get("COSYSERVE_SCREENSHOT"):
        page.screenshot(path=os.environ["COSYSERVE_SCREENSHOT"], full_page=True)

    # cross-lingual, mp3 at 16 kHz: the server encodes the very samples that were played
    page.get_by_test_id("sample-rate").select_option("16000")
    _speak(page, "cross_lingual_replication", "mp3")
    _played_to_the_end(page)
    audio, rate = sf.read(io.BytesIO(_download(page)), dtype="float32")
    assert rate == 16000 and abs(len(audio) / rate - _shown_seconds(page)) < 2 * 1152 / rate

    # instruct, pcm; then the same run as wav: the same samples behind a header
    _speak(page, "natural_language_replication", "pcm", instruct="Speak slowly.")
    _played_to_the_end(page)
    pcm = _download(page)
    assert len(pcm) % 2 == 0 and abs(len(pcm) / 2 / 16000 - _shown_seconds(page)) < 0.01
    page.get_by_test_id("format").select_option("wav")
    wav = _download(page)
    assert wav[:4] == b"RIFF" and wav[44:] == pcm
    assert page.get_by_test_id("error").is_hidden()


PLAYER_CHECK = """async () => {
  const { PcmPlayer } = await import("/webui/player.js");
  const states = [];
  const player = new PcmPlayer(24000, (state) => states.push(state));
  player.resume();
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  for (const n of [2400, 1200, 4800]) player.push(new Int16Array(n));  // 0.1 + 0.05 + 0.2 s at once
  const span = player.next - player.startedAt;
  const underrunsWhileFed = player.underruns;
  for (let waited = 0; player.context.currentTime < player.next + 0.05 && waited < 5000; waited += 50) {
    await sleep(50);  // until all of it has played: the next chunk is late
  }
  player.push(new Int16Array(2400));
  const underrunsAfterGap = player.underruns;
  player.end();
  for (let waited = 0; player.state !== "ended" && waited < 5000; waited += 50) await sleep(50);
  return { span, underrunsWhileFed, underrunsAfterGap, states, seconds: player.seconds };
}"""


def test_player_schedules_back_to_back_and_counts_underruns(page: Page) -> None:
    got = page.evaluate(PLAYER_CHECK)
    assert got["span"] == pytest.approx(0.35, abs=1e-9)  # each buffer starts where the previous one ends
    assert got["underrunsWhileFed"] == 0 and got["underrunsAfterGap"] == 1
    assert got["seconds"] == pytest.approx(0.45, abs=1e-9)
    assert got["states"] == ["buffering", "playing", "ended"]


def test_record_play_and_delete_a_voice(page: Page) -> None:
    before = _voice_count(page)
    record = page.get_by_test_id("voice-record")
    record.click()  # the fake microphone: Chromium's beeps
    expect(record).to_have_attribute("aria-pressed", "true")
    expect(page.get_by_test_id("record-state")).to_have_text(re.compile(r"recording… ([1-9]|\d\d)\.\d s"))
    record.click()
    expect(page.get_by_test_id("record-state")).to_have_text(re.compile(r"^recorded \d+\.\d s"))
    page.get_by_test_id("voice-upload-text").fill("Beep beep.")
    page.get_by_test_id("voice-upload-submit").click()
    expect(page.get_by_test_id("voice-info")).to_have_text(f"{before + 1} voice{'' if before == 0 else 's'}")
    assert page.get_by_test_id("voice-select").locator("option:checked").text_content().startswith("Beep beep.")

    page.get_by_test_id("voice-play").click()  # the local recording: played from a blob URL
    assert page.get_by_test_id("error").is_hidden()

    page.get_by_test_id("voice-delete").click()
    expect(page.get_by_test_id("voice-info")).to_have_text(re.compile(rf"^{before} voices?$"))
    assert "Beep beep." not in page.get_by_test_id("voice-select").inner_text()


def test_stop_silences_and_keeps_what_arrived(page: Page, tmp_path: Path) -> None:
    _upload_file(page, tmp_path)
    _speak(page, "fast_replication", "pcm")
    expect(page.get_by_test_id("player-state")).to_have_text("playing")
    page.get_by_test_id("stop").click()
    expect(page.get_by_test_id("player-state")).to_have_text("stopped")
    expect(page.get_by_test_id("stop")).to_be_disabled()
    assert len(_download(page)) > 0
    assert page.get_by_test_id("error").is_hidden()


def test_api_errors_are_shown_in_the_apis_words(page: Page, server: SpawnedServer, tmp_path: Path) -> None:
    _upload_file(page, tmp_path)
    error = page.get_by_test_id("error")

    _upload_file_expecting_error(page, tmp_path)
    expect(error).to_have_text(re.compile(r"^reference audio too short: 0\.20 s"))

    # task-failed on the WebSocket: its error_message, as sent
    _speak(page, "natural_language_replication", "wav")
    expect(error).to_have_text(re.compile(r"instruct.*is required for natural_language_replication"))
    expect(page.get_by_test_id("player-state")).to_have_text("failed")

    # the WebSocket refused (wrong token): the page asks the API why and shows its message
    page.evaluate("sessionStorage.setItem('cosyserve.token', 'wrong-token')")
    _speak(page, "fast_replication", "wav")
    expect(error).to_have_text("invalid or missing token")
    expect(page.get_by_test_id("player-state")).to_have_text("failed")

    # a wrong token typed in: the voice list says the same
    page.get_by_test_id("token").fill("still-wrong")
    page.get_by_test_id("voice-refresh").click()
    expect(error).to_have_text("invalid or missing token")
    log = server.log_path.read_text(errors="replace")
    assert "wrong-token" not in log and "still-wrong" not in log and server.token not in log


def _upload_file_expecting_error(page: Page, tmp_path: Path) -> None:
    path = tmp_path / "short.wav"
    path.write_bytes(wav_bytes(0.2, 16000))
    page.get_by_test_id("voice-upload-file").set_input_files(str(path))
    page.get_by_test_id("voice-upload-text").fill("Too short.")
    page.get_by_test_id("voice-upload-submit").click()
