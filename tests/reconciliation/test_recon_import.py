"""Statement import: camt.053 001.02 and 001.08, CSV mappings, idempotency, conflicts,
continuity and arithmetic breaks, hostile and malformed files refused with nothing stored."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import recon_helpers as h
from helpers import Platform

from ledger.service import LedgerService
from reconciliation import camt053, csv_import, statements
from reconciliation.model import StatementError, decimal_to_minor
from reconciliation.statements import PlatformConfig, ReconStore

CONFIG = PlatformConfig(accounts={h.IBAN: "omni"})
DAY1, DAY2, DAY3 = "2023-11-15", "2023-11-16", "2023-11-17"


def _day1() -> h.Stmt:
    return h.Stmt(
        "STMT-1",
        1,
        0,
        120_000,
        DAY1,
        [
            h.Tx(100_000, DAY1, ("E2E-A",), "BR1", "Alice", "CN55ALICE01", "top up"),
            h.Tx(50_000, DAY1, ("E2E-B",), "BR2", "Bob", "CN66BOB01"),
            h.Tx(-30_000, DAY1, ("W-1",), "BR3", "Carol", "CN77CAROL1"),
        ],
    )


def _counts(recon: ReconStore, platform: str) -> dict[str, int]:
    db = recon.db
    out = {}
    with db.reading() as cur:
        for table in (statements.FILES, statements.STATEMENTS, statements.ENTRIES):
            row = db.fetchone(
                cur, f"SELECT COUNT(*) FROM {db.t(table)} WHERE platform = {db.ph}", (platform,)
            )
            assert row is not None
            out[table] = int(row[0])
    return out


@pytest.fixture
def recon(service: LedgerService, platform: Platform) -> ReconStore:
    r = ReconStore(service.store)
    r.ensure_tables()
    return r


@pytest.mark.parametrize("version", [2, 8])
def test_camt053_versions_import_and_keep_the_raw_file(
    recon: ReconStore, platform: Platform, version: int
) -> None:
    raw = h.camt053([_day1()], version)
    res = recon.import_file("p1", raw, "camt053", CONFIG, now_ms=1)
    assert res.status == "imported"
    assert res.sha256 == hashlib.sha256(raw).hexdigest()
    assert recon.raw_file("p1", res.sha256) == raw
    [s] = recon.statements("p1")
    assert (s.status, s.mirror, s.currency, s.sequence) == ("used", "omni", "CNY", 1)
    assert (s.opening_minor, s.closing_minor, s.closing_date) == (0, 120_000, DAY1)
    entries = recon.entries("p1", s.sha256, 0)
    assert [e.amount_minor for e in entries] == [100_000, 50_000, -30_000]
    assert entries[0].end_to_end_ids == ("E2E-A",)
    assert entries[0].counterparty_name == "Alice"
    assert entries[2].counterparty_account == "CN77CAROL1"  # the creditor of a debit
    assert entries[0].bank_tx_code == "PMNT/RCDT/ESCT"
    assert entries[0].remittance == "top up"
    assert recon.events("p1") == []


def test_reimport_is_a_no_op(recon: ReconStore, platform: Platform) -> None:
    raw = h.camt053([_day1()], 8)
    first = recon.import_file("p1", raw, "camt053", CONFIG, now_ms=1)
    before = _counts(recon, "p1")
    again = recon.import_file("p1", raw, "camt053", CONFIG, now_ms=2)
    assert (first.status, again.status) == ("imported", "duplicate")
    assert again.sha256 == first.sha256
    assert (
        _counts(recon, "p1")
        == before
        == {
            statements.FILES: 1,
            statements.STATEMENTS: 1,
            statements.ENTRIES: 3,
        }
    )


def test_a_different_file_for_the_same_statement_is_a_conflict(
    recon: ReconStore, platform: Platform
) -> None:
    recon.import_file("p1", h.camt053([_day1()], 8), "camt053", CONFIG, now_ms=1)
    forged = _day1()
    forged.txs[0].amount_minor = 90_000
    forged.closing = 110_000
    raw = h.camt053([forged], 8, msg_id="MSG-2")
    res = recon.import_file("p1", raw, "camt053", CONFIG, now_ms=2)
    assert res.status == "conflict"
    [event] = recon.events("p1", [statements.STATEMENT_CONFLICT])
    assert event.statement_key == f"{h.IBAN}|STMT-1|1"
    assert event.sha256 == res.sha256
    used = recon.statements("p1", status="used")
    assert [s.closing_minor for s in used] == [120_000]  # the first one stays in use
    assert recon.raw_file("p1", res.sha256) == raw  # kept as evidence


def test_continuity_arithmetic_sequence_and_account_breaks(
    recon: ReconStore, platform: Platform
) -> None:
    recon.import_file("p1", h.camt053([_day1()], 2), "camt053", CONFIG, now_ms=1)
    # opening is not the previous closing
    bad_open = h.Stmt("STMT-2", 2, 100_000, 100_000, DAY2, [])
    r1 = recon.import_file("p1", h.camt053([bad_open], 2), "camt053", CONFIG, now_ms=2)
    # entries do not add up to closing - opening
    bad_sum = h.Stmt("STMT-2b", 2, 120_000, 130_000, DAY2, [h.Tx(5_000, DAY2, ("X",))])
    r2 = recon.import_file("p1", h.camt053([bad_sum], 2), "camt053", CONFIG, now_ms=3)
    # a gap in the sequence
    gap = h.Stmt("STMT-3", 3, 120_000, 120_000, DAY3, [])
    r3 = recon.import_file("p1", h.camt053([gap], 2), "camt053", CONFIG, now_ms=4)
    # not the platform's omnibus account
    other = h.Stmt("STMT-9", 1, 0, 0, DAY1, [], account=h.OTHER_IBAN)
    r4 = recon.import_file("p1", h.camt053([other], 2), "camt053", CONFIG, now_ms=5)
    assert [r.status for r in (r1, r2, r3, r4)] == ["broken"] * 4
    kinds = [e.kind for e in recon.events("p1")]
    assert kinds == [
        statements.CONTINUITY_BREAK,
        statements.ARITHMETIC_BREAK,
        statements.SEQUENCE_GAP,
        statements.ACCOUNT_UNKNOWN,
    ]
    assert [s.statement_id for s in recon.statements("p1", status="used")] == ["STMT-1"]
    # the bank's corrected day 2 follows on and is used
    good = h.Stmt("STMT-2", 2, 120_000, 120_000, DAY2, [])
    r5 = recon.import_file("p1", h.camt053([good], 8, "MSG-9"), "camt053", CONFIG, now_ms=6)
    assert r5.status == "imported"
    assert recon.events("p1", [statements.STATEMENT_RESENT])


def test_csv_mappings_give_the_same_entries_as_camt(recon: ReconStore, platform: Platform) -> None:
    stmt = _day1()
    signed = csv_import.parse(h.csv_signed(stmt), csv_import.load_mapping(h.CSV_MAPPING_SIGNED))
    split = csv_import.parse(h.csv_split(stmt), csv_import.load_mapping(h.CSV_MAPPING_SPLIT))
    camt = camt053.parse(h.camt053([stmt], 8))

    def shape(s: Any) -> tuple[Any, ...]:
        return (
            s.opening_minor,
            s.closing_minor,
            s.closing_date,
            [(e.amount_minor, e.booking_date) for e in s.entries],
        )

    assert shape(signed[0]) == shape(split[0]) == shape(camt[0])
    assert signed[0].entries[0].end_to_end_ids == ("E2E-A",)
    assert split[0].entries[2].entry_ref == "W-1"
    res = recon.import_file(
        "p1",
        h.csv_signed(stmt),
        "csv",
        CONFIG,
        csv_import.load_mapping(h.CSV_MAPPING_SIGNED),
        now_ms=1,
    )
    assert res.status == "imported"


def test_amounts_are_exact_decimals() -> None:
    assert decimal_to_minor("1234.50", "CNY", "x") == 123_450
    assert decimal_to_minor("1234.5000", "CNY", "x") == 123_450
    assert decimal_to_minor("7", "JPY", "x") == 7
    for bad in ("1e3", "1.005", "-1", "1,00", "", "0x10", "１.00"):
        with pytest.raises(StatementError):
            decimal_to_minor(bad, "CNY", "x")
    mapping = csv_import.load_mapping(h.CSV_MAPPING_SIGNED)
    text = h.csv_signed(_day1()).replace(b"1000.00", b"1000.005")
    with pytest.raises(StatementError, match="decimals"):
        csv_import.parse(text, mapping)


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.02"><BkToCstmrStmt>
<GrpHdr><MsgId>&lol4;</MsgId><CreDtTm>2023-11-16T06:00:00</CreDtTm></GrpHdr>
</BkToCstmrStmt></Document>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:camt.053.001.02"><BkToCstmrStmt>
<GrpHdr><MsgId>&xxe;</MsgId><CreDtTm>2023-11-16T06:00:00</CreDtTm></GrpHdr>
</BkToCstmrStmt></Document>"""


def _hostile() -> dict[str, bytes]:
    good = h.camt053([_day1()], 8)
    return {
        "billion laughs": BILLION_LAUGHS,
        "external entity": EXTERNAL_ENTITY,
        "lower-case doctype": EXTERNAL_ENTITY.replace(b"DOCTYPE", b"doctype"),
        "truncated": good[: len(good) // 2],
        "not camt.053": good.replace(b"camt.053.001.08", b"camt.052.001.08"),
        "camt.053.001.01": good.replace(b"camt.053.001.08", b"camt.053.001.01"),
        "float amount": good.replace(b">1000.00<", b">1.0e3<"),
        "unknown status": good.replace(b"<Cd>BOOK</Cd>", b"<Cd>GONE</Cd>", 1),
        "no closing balance": good.replace(b"CLBD", b"CLAV"),
        "two account ids": good.replace(b"</IBAN>", b"</IBAN><IBAN>CN00X1</IBAN>", 1),
        "batch amounts disagree": h.camt053(
            [
                h.Stmt(
                    "S",
                    1,
                    0,
                    80_000,
                    DAY1,
                    [h.Tx(80_000, DAY1, ("P1", "P2"), amounts=(30_000, 40_000))],
                )
            ],
            8,
        ),
    }


@pytest.mark.parametrize("name", sorted(_hostile()))
def test_hostile_and_malformed_files_are_refused_with_nothing_stored(
    recon: ReconStore, platform: Platform, name: str
) -> None:
    raw = _hostile()[name]
    with pytest.raises(StatementError) as info:
        recon.import_file("p1", raw, "camt053", CONFIG, now_ms=1)
    assert str(info.value)  # a clear message
    assert "root:" not in str(info.value)  # nothing of /etc/passwd leaked into it
    assert _counts(recon, "p1") == {
        statements.FILES: 0,
        statements.STATEMENTS: 0,
        statements.ENTRIES: 0,
    }
    assert recon.events("p1") == []


def test_oversized_file_is_refused_before_parsing(recon: ReconStore, platform: Platform) -> None:
    raw = h.camt053([_day1()], 8)
    with pytest.raises(StatementError, match="larger"):
        recon.import_file("p1", raw, "camt053", CONFIG, now_ms=1, max_bytes=len(raw) - 1)


def test_bad_mappings_name_the_problem() -> None:
    with pytest.raises(StatementError, match="columns"):
        csv_import.load_mapping('{"columns": {"account": "a"}}')
    with pytest.raises(StatementError, match="amount_sign"):
        csv_import.load_mapping(h.CSV_MAPPING_SIGNED.replace('"signed"', '"guess"'))
    with pytest.raises(StatementError, match="unknown fields"):
        csv_import.load_mapping(h.CSV_MAPPING_SIGNED.replace('"memo"', '"memo", "x": "y"'))
    mapping = csv_import.load_mapping(h.CSV_MAPPING_SIGNED)
    text = h.csv_signed(_day1())
    lines = text.split(b"\n")
    lines[2] = lines[2].replace(b"STMT-1", b"STMT-X")
    with pytest.raises(StatementError, match="differ"):
        csv_import.parse(b"\n".join(lines), mapping)


def test_schema_validation_when_an_xsd_is_supplied(tmp_path: Any) -> None:
    """With an XSD for the version in `xsd_dir` the document is checked against it (here a
    deliberately narrow schema of our own: the official ones are not shipped, see docs)."""
    xsd = tmp_path / "camt.053.001.08.xsd"
    xsd.write_text(
        '<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" '
        'targetNamespace="urn:iso:std:iso:20022:tech:xsd:camt.053.001.08" '
        'elementFormDefault="qualified"><xs:element name="Document">'
        '<xs:complexType><xs:sequence><xs:element name="Nothing"/></xs:sequence>'
        "</xs:complexType></xs:element></xs:schema>"
    )
    raw = h.camt053([_day1()], 8)
    with pytest.raises(StatementError, match="schema"):
        camt053.parse(raw, tmp_path)
    assert camt053.parse(h.camt053([_day1()], 2), tmp_path)  # no 001.02 XSD there: not checked
