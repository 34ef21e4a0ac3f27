"""lighten.formats.spec, the torch-free parser, against the codecs in lighten.formats.format."""

from lighten.formats.format import ELEMENTS
from lighten.formats.spec import DEFAULTS, canonical


def test_every_parsed_name_has_a_codec():
    assert set(DEFAULTS) == set(ELEMENTS)


def test_canonical_names():
    assert canonical(" INT4 ") == "int4:g128:sym"
    assert canonical("mxfp8") == "mxfp8_e4m3:g32"
    assert canonical("nf4:dq") == "nf4:g64:dq"
