"""Bank statements for the reconciliation tests, written by hand from the ISO 20022 message
definitions of camt.053.001.02 and camt.053.001.08 (element order and cardinality as in the
published schemas; not produced by our own code), and CSV files in two bank styles."""

from __future__ import annotations

from dataclasses import dataclass, field
from xml.sax.saxutils import escape

IBAN = "CN12OMNI0000000000000001"
OTHER_IBAN = "CN99ELSE0000000000000002"


@dataclass
class Tx:
    amount_minor: int  # signed: + credit, - debit
    day: str  # booking date
    e2e: tuple[str, ...] = ()
    ref: str = ""  # AcctSvcrRef
    name: str = ""
    account: str = ""
    remittance: str = ""
    amounts: tuple[int, ...] = ()  # per transaction of a batch entry (minor units)


@dataclass
class Stmt:
    stmt_id: str
    seq: int | None
    opening: int
    closing: int
    day: str
    txs: list[Tx] = field(default_factory=list)
    account: str = IBAN
    ccy: str = "CNY"
    opening_code: str = "OPBD"


def money(minor: int) -> str:
    """Minor units as ISO 20022 decimal text (2 decimals)."""
    m = abs(minor)
    return f"{m // 100}.{m % 100:02d}"


def _ind(minor: int) -> str:
    return "CRDT" if minor >= 0 else "DBIT"


def _party(v: int, tx: Tx) -> str:
    if not (tx.name or tx.account):
        return ""
    who = "Dbtr" if tx.amount_minor > 0 else "Cdtr"
    name = escape(tx.name)
    if v >= 8:
        nm = f"<{who}><Pty><Nm>{name}</Nm></Pty></{who}>" if tx.name else ""
    else:
        nm = f"<{who}><Nm>{name}</Nm></{who}>" if tx.name else ""
    acct = f"<{who}Acct><Id><IBAN>{tx.account}</IBAN></Id></{who}Acct>" if tx.account else ""
    return f"<RltdPties>{nm}{acct}</RltdPties>"


def _tx_details(v: int, tx: Tx) -> str:
    ids = tx.e2e or ("NOTPROVIDED",)
    out = []
    for k, e2e in enumerate(ids):
        amt = ""
        if tx.amounts:
            amt = f'<AmtDtls><TxAmt><Amt Ccy="CNY">{money(tx.amounts[k])}</Amt></TxAmt></AmtDtls>'
        rmt = f"<RmtInf><Ustrd>{escape(tx.remittance)}</Ustrd></RmtInf>" if tx.remittance else ""
        out.append(
            f"<TxDtls><Refs><EndToEndId>{escape(e2e)}</EndToEndId></Refs>{amt}"
            f"{_party(v, tx)}{rmt}</TxDtls>"
        )
    return "".join(out)


def camt053(stmts: list[Stmt], version: int = 2, msg_id: str = "MSG-1") -> bytes:
    """A BkToCstmrStmt document of camt.053.001.0<version> (2 or 8)."""
    ns = f"urn:iso:std:iso:20022:tech:xsd:camt.053.001.{version:02d}"
    parts = [
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Document xmlns="{ns}"><BkToCstmrStmt>'
        f"<GrpHdr><MsgId>{msg_id}</MsgId><CreDtTm>2023-11-16T06:00:00</CreDtTm></GrpHdr>"
    ]
    for s in stmts:
        seq = f"<ElctrncSeqNb>{s.seq}</ElctrncSeqNb>" if s.seq is not None else ""
        parts.append(
            f"<Stmt><Id>{s.stmt_id}</Id>{seq}<CreDtTm>{s.day}T23:59:59</CreDtTm>"
            f"<Acct><Id><IBAN>{s.account}</IBAN></Id><Ccy>{s.ccy}</Ccy></Acct>"
        )
        for code, amount in ((s.opening_code, s.opening), ("CLBD", s.closing)):
            parts.append(
                f"<Bal><Tp><CdOrPrtry><Cd>{code}</Cd></CdOrPrtry></Tp>"
                f'<Amt Ccy="{s.ccy}">{money(amount)}</Amt><CdtDbtInd>{_ind(amount)}</CdtDbtInd>'
                f"<Dt><Dt>{s.day}</Dt></Dt></Bal>"
            )
        for i, tx in enumerate(s.txs):
            sts = "<Sts><Cd>BOOK</Cd></Sts>" if version >= 8 else "<Sts>BOOK</Sts>"
            ref = f"<AcctSvcrRef>{tx.ref}</AcctSvcrRef>" if tx.ref else ""
            btch = f"<Btch><NbOfTxs>{len(tx.e2e)}</NbOfTxs></Btch>" if len(tx.e2e) > 1 else ""
            parts.append(
                f"<Ntry><NtryRef>{i + 1}</NtryRef>"
                f'<Amt Ccy="{s.ccy}">{money(tx.amount_minor)}</Amt>'
                f"<CdtDbtInd>{_ind(tx.amount_minor)}</CdtDbtInd>{sts}"
                f"<BookgDt><Dt>{tx.day}</Dt></BookgDt><ValDt><Dt>{tx.day}</Dt></ValDt>{ref}"
                "<BkTxCd><Domn><Cd>PMNT</Cd><Fmly><Cd>"
                f"{'RCDT' if tx.amount_minor > 0 else 'ICDT'}</Cd><SubFmlyCd>"
                f"{'ESCT' if tx.amount_minor > 0 else 'DMCT'}</SubFmlyCd></Fmly></Domn></BkTxCd>"
                f"<NtryDtls>{btch}{_tx_details(version, tx)}</NtryDtls></Ntry>"
            )
        parts.append("</Stmt>")
    parts.append("</BkToCstmrStmt></Document>\n")
    return "".join(parts).encode()


CSV_MAPPING_SIGNED = """{
  "bank": "bank-a",
  "date_format": "%Y%m%d",
  "decimal_places": 2,
  "amount_sign": "signed",
  "columns": {
    "account": "acct", "statement_id": "stmt", "sequence": "seq", "currency": "ccy",
    "opening_balance": "open", "closing_balance": "close", "closing_date": "day",
    "booking_date": "date", "amount": "amount", "end_to_end_id": "e2e",
    "counterparty_name": "name", "counterparty_account": "cp", "remittance": "memo"
  }
}"""

CSV_MAPPING_SPLIT = """{
  "bank": "bank-b",
  "encoding": "gb18030",
  "delimiter": ";",
  "date_format": "%d.%m.%Y",
  "decimal_places": 2,
  "decimal_separator": ",",
  "thousands_separator": ".",
  "amount_sign": "split",
  "currency": "CNY",
  "columns": {
    "account": "Konto", "statement_id": "Auszug", "opening_balance": "Anfang",
    "closing_balance": "Ende", "booking_date": "Buchung", "debit": "Soll", "credit": "Haben",
    "reference": "Referenz", "counterparty_name": "Name"
  }
}"""


def csv_signed(s: Stmt) -> bytes:
    """Bank A: one row per entry, signed amounts, statement columns repeated."""
    lines = ["acct,stmt,seq,ccy,open,close,day,date,amount,e2e,name,cp,memo"]
    head = (
        f"{s.account},{s.stmt_id},{'' if s.seq is None else s.seq},{s.ccy},"
        f"{money(s.opening)},{money(s.closing)},{s.day.replace('-', '')}"
    )
    for tx in s.txs:
        sign = "-" if tx.amount_minor < 0 else ""
        lines.append(
            f"{head},{tx.day.replace('-', '')},{sign}{money(tx.amount_minor)},"
            f"{(tx.e2e or ('',))[0]},{tx.name},{tx.account},{tx.remittance}"
        )
    if not s.txs:
        lines.append(f"{head},,,,,,")
    return ("\n".join(lines) + "\n").encode()


def _de(minor: int) -> str:
    whole, frac = divmod(abs(minor), 100)
    return f"{whole:,}".replace(",", ".") + f",{frac:02d}"


def csv_split(s: Stmt) -> bytes:
    """Bank B: GB18030, semicolons, dd.mm.yyyy, 1.234,56, separate debit and credit columns."""
    lines = ["Konto;Auszug;Anfang;Ende;Buchung;Soll;Haben;Referenz;Name"]
    for tx in s.txs:
        d = tx.day.split("-")
        debit = _de(tx.amount_minor) if tx.amount_minor < 0 else ""
        credit = _de(tx.amount_minor) if tx.amount_minor > 0 else ""
        lines.append(
            f"{s.account};{s.stmt_id};{_de(s.opening)};{_de(s.closing)};"
            f"{d[2]}.{d[1]}.{d[0]};{debit};{credit};{(tx.e2e or ('',))[0]};{tx.name}"
        )
    return ("\r\n".join(lines) + "\r\n").encode("gb18030")
