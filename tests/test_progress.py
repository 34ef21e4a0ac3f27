"""Status lines print what they are given: an error's text or a path with brackets is not rich markup (a
closing tag like [/x] in a failed job's message would otherwise raise inside the progress display)."""

from lighten.progress import note


def test_a_note_prints_brackets_as_written(capsys):
    note("3/4 failed: tiny q4_k [/bold] rows[0] are [red] 64 wide")
    assert capsys.readouterr().err.strip() == "3/4 failed: tiny q4_k [/bold] rows[0] are [red] 64 wide"
