"""ISO 20022 camt.053 (BankToCustomerStatement), versions 001.02 and later, parsed with lxml.

Parsing is defensive: the file's size is capped before it is read; a DOCTYPE or ENTITY
declaration (which no ISO 20022 message has) refuses the file before the parser sees it; the
parser itself never resolves entities, loads a DTD, touches the network or builds huge trees.
Every element we use is checked (presence, cardinality, codes, amounts, dates) whether or not
an XSD is available; with `xsd_dir` holding the official `camt.053.001.NN.xsd` files the whole
document is also validated against the schema of its version.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from lxml import etree

from reconciliation.model import (
    MAX_FILE_BYTES,
    Entry,
    Statement,
    StatementError,
    check_currency,
    check_date,
    clean_text,
    decimal_to_minor,
    is_digits,
)

NS_PREFIX: Final = "urn:iso:std:iso:20022:tech:xsd:camt.053.001."
_NS_MATCH: Final = re.compile(
    r"urn:iso:std:iso:20022:tech:xsd:camt\.053\.001\.([0-9]{2})"
).fullmatch
_DECLARATION: Final = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
OPENING_CODES: Final = ("OPBD", "PRCD")  # opening booked; previously closed booked
CLOSING_CODES: Final = ("CLBD",)
ENTRY_STATUSES: Final = frozenset({"BOOK", "PDNG", "INFO", "FUTR"})
MAX_ENTRIES: Final = 1_000_000


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        dtd_validation=False,
        remove_comments=True,
        remove_pis=True,
        remove_blank_text=True,
        collect_ids=False,
    )


def parse_xml(raw: bytes, max_bytes: int = MAX_FILE_BYTES) -> etree._Element:
    """Securely parse XML bytes into an element tree, or raise StatementError."""
    if len(raw) > max_bytes:
        raise StatementError(f"the file is larger than {max_bytes} bytes")
    if _DECLARATION.search(raw[:65536]) is not None or _DECLARATION.search(raw) is not None:
        raise StatementError("the file declares a DOCTYPE or an ENTITY: refused (not ISO 20022)")
    try:
        root = etree.fromstring(raw, _parser())
    except etree.XMLSyntaxError as exc:
        raise StatementError(f"the file is not well-formed XML: {exc}") from None
    doctype: str = getattr(root.getroottree().docinfo, "doctype", "") or ""
    if doctype:
        raise StatementError("the file declares a DOCTYPE: refused")
    for node in root.iter():
        if not isinstance(node.tag, str):  # entity references, processing instructions left
            raise StatementError("the file contains entity references: refused")
    return root


def version_of(root: etree._Element) -> str:
    """`camt.053.001.NN` from the document namespace; refuses other messages and 001.01."""
    qname = etree.QName(root)
    m = _NS_MATCH(qname.namespace or "")
    if qname.localname != "Document" or m is None:
        raise StatementError(
            f"not a camt.053 document (root {qname.localname!r} in {qname.namespace!r})"
        )
    if int(m.group(1)) < 2:
        raise StatementError("camt.053.001.01 is not supported (001.02 and later are)")
    return f"camt.053.001.{m.group(1)}"


def validate_xsd(root: etree._Element, version: str, xsd_dir: Path) -> bool:
    """Validate against `xsd_dir/<version>.xsd` if that file exists; True if it was checked."""
    path = xsd_dir / f"{version}.xsd"
    if not path.is_file():
        return False
    schema_doc = etree.parse(str(path), _parser())
    schema = etree.XMLSchema(schema_doc)
    if not schema.validate(root):
        lines = str(schema.error_log).splitlines()
        raise StatementError(f"{version} schema: {lines[0] if lines else 'invalid'}")
    return True


def parse(
    raw: bytes, xsd_dir: Path | None = None, max_bytes: int = MAX_FILE_BYTES
) -> list[Statement]:
    """Every statement (`Stmt`) in a camt.053 file."""
    root = parse_xml(raw, max_bytes)
    version = version_of(root)
    if xsd_dir is not None:
        validate_xsd(root, version, xsd_dir)
    r = _Reader(etree.QName(root).namespace or "", version)
    msg = r.one(root, "BkToCstmrStmt")
    hdr = r.one(msg, "GrpHdr")
    r.text(hdr, "MsgId", 35)
    r.one(hdr, "CreDtTm")
    stmts = r.many(msg, "Stmt")
    if not stmts:
        raise StatementError("the file has no Stmt")
    return [r.statement(s) for s in stmts]


class _Reader:
    """Checked access to the elements we use, with paths in every error message."""

    def __init__(self, ns: str, version: str) -> None:
        self.ns = ns
        self.version = version
        self.v = int(version.rsplit(".", 1)[1])
        self._paths: dict[str, str] = {}

    def _q(self, path: str) -> str:
        """`A/B` -> `{ns}A/{ns}B` (cached): lxml then walks the path in C."""
        q = self._paths.get(path)
        if q is None:
            q = "/".join(f"{{{self.ns}}}{part}" for part in path.split("/"))
            self._paths[path] = q
        return q

    def many(self, el: etree._Element, name: str) -> list[etree._Element]:
        return el.findall(self._q(name))

    def opt(self, el: etree._Element, path: str) -> etree._Element | None:
        found = el.findall(self._q(path))
        if len(found) > 1:
            raise StatementError(f"{_path(el)}/{path} appears {len(found)} times")
        return found[0] if found else None

    def one(self, el: etree._Element, path: str) -> etree._Element:
        node = self.opt(el, path)
        if node is None:
            raise StatementError(f"{_path(el)}: missing {path}")
        return node

    def text(self, el: etree._Element, path: str, limit: int, required: bool = True) -> str:
        node = self.one(el, path) if required else self.opt(el, path)
        if node is None:
            return ""
        if len(node):
            raise StatementError(f"{_path(node)}: expected text, found elements")
        value = clean_text(node.text, _P(node), limit)
        if required and not value:
            raise StatementError(f"{_path(node)}: empty")
        return value

    def amount(self, el: etree._Element, currency: str | None = None) -> tuple[int, str]:
        """(signed minor units, currency) of an Amt + CdtDbtInd pair under `el`."""
        amt = self.one(el, "Amt")
        ccy = check_currency(amt.get("Ccy", ""), _P(amt, "@Ccy"))
        if currency is not None and ccy != currency:
            raise StatementError(f"{_path(amt)}: currency {ccy} is not the account's {currency}")
        value = decimal_to_minor(amt.text or "", ccy, _P(amt))
        ind = self.text(el, "CdtDbtInd", 4)
        if ind not in ("CRDT", "DBIT"):
            raise StatementError(f"{_path(el)}/CdtDbtInd: {ind!r} is not CRDT or DBIT")
        return (value if ind == "CRDT" else -value), ccy

    def date(self, el: etree._Element, path: str, required: bool = True) -> str:
        node = self.one(el, path) if required else self.opt(el, path)
        if node is None:
            return ""
        d = self.opt(node, "Dt")
        if d is not None:
            return check_date(d.text or "", _P(d))
        t = self.opt(node, "DtTm")
        if t is not None:
            return check_date(t.text or "", _P(t))
        raise StatementError(f"{_path(node)}: neither Dt nor DtTm")

    def account(self, stmt: etree._Element) -> tuple[str, str]:
        acct = self.one(stmt, "Acct")
        ident = self.one(acct, "Id")
        iban = self.text(ident, "IBAN", 34, required=False)
        number = iban or self.text(ident, "Othr/Id", 34)
        return number, self.text(acct, "Ccy", 3, required=False)

    def statement(self, s: etree._Element) -> Statement:
        stmt_id = self.text(s, "Id", 35)
        seq_text = self.text(s, "ElctrncSeqNb", 18, required=False) or self.text(
            s, "LglSeqNb", 18, required=False
        )
        if seq_text and not is_digits(seq_text):
            raise StatementError(f"{_path(s)}: sequence number {seq_text!r} is not a number")
        self.one(s, "CreDtTm")
        account, acct_ccy = self.account(s)
        opening: tuple[int, str, str] | None = None
        closing: tuple[int, str, str] | None = None
        for bal in self.many(s, "Bal"):
            code = self.text(self.one(bal, "Tp"), "CdOrPrtry/Cd", 4, required=False)
            if code in OPENING_CODES or code in CLOSING_CODES:
                value, ccy = self.amount(bal)
                day = self.date(bal, "Dt")
                if code in CLOSING_CODES:
                    if closing is not None:
                        raise StatementError(f"{_path(s)}: two closing balances")
                    closing = (value, ccy, day)
                else:
                    if opening is not None:
                        raise StatementError(f"{_path(s)}: two opening balances")
                    opening = (value, ccy, day)
        if opening is None or closing is None:
            raise StatementError(f"{_path(s)}: needs an opening (OPBD/PRCD) and a CLBD balance")
        currency = acct_ccy or opening[1]
        check_currency(currency, f"{_path(s)}/Acct/Ccy")
        if opening[1] != currency or closing[1] != currency:
            raise StatementError(f"{_path(s)}: balances are not in the account currency")
        ntries = self.many(s, "Ntry")
        if len(ntries) > MAX_ENTRIES:
            raise StatementError(f"{_path(s)}: more than {MAX_ENTRIES} entries")
        entries = tuple(self.entry(n, i, currency) for i, n in enumerate(ntries))
        return Statement(
            fmt="camt053",
            version=self.version,
            statement_id=stmt_id,
            sequence=int(seq_text) if seq_text else None,
            account=account,
            currency=currency,
            opening_minor=opening[0],
            closing_minor=closing[0],
            opening_date=opening[2],
            closing_date=closing[2],
            entries=entries,
        )

    def status(self, n: etree._Element) -> str:
        sts = self.one(n, "Sts")
        if self.v >= 8 or len(sts):  # 001.08+: <Sts><Cd>BOOK</Cd></Sts>
            code = self.text(sts, "Cd", 4, required=False) or self.text(sts, "Prtry", 35)
        else:
            code = clean_text(sts.text, _P(sts), 4)
        if code not in ENTRY_STATUSES:
            raise StatementError(f"{_path(sts)}: unknown entry status {code!r}")
        return code

    def entry(self, n: etree._Element, index: int, currency: str) -> Entry:
        amount, _ = self.amount(n, currency)
        status = self.status(n)
        booking = self.date(n, "BookgDt", required=status == "BOOK")
        value = self.date(n, "ValDt", required=False) or booking
        self.one(n, "BkTxCd")
        rvsl = self.text(n, "RvslInd", 5, required=False)
        if rvsl not in ("", "true", "false"):
            raise StatementError(f"{_path(n)}/RvslInd: {rvsl!r}")
        e2e: list[str] = []
        instr: list[str] = []
        batch_id = ""
        cp_name = cp_acct = remit = reason = ""
        tx_total = 0
        tx_count = 0
        for dtls in self.many(n, "NtryDtls"):
            btch = self.opt(dtls, "Btch")
            if btch is not None:
                batch_id = batch_id or self.text(btch, "PmtInfId", 35, required=False)
                batch_id = batch_id or self.text(btch, "MsgId", 35, required=False)
            for tx in self.many(dtls, "TxDtls"):
                tx_count += 1
                refs = self.opt(tx, "Refs")
                if refs is not None:
                    e = self.text(refs, "EndToEndId", 35, required=False)
                    if e:
                        e2e.append(e)
                    i = self.text(refs, "InstrId", 35, required=False)
                    if i:
                        instr.append(i)
                    batch_id = batch_id or self.text(refs, "PmtInfId", 35, required=False)
                amt_el = self.opt(tx, "AmtDtls/TxAmt/Amt")
                if amt_el is None:
                    amt_el = self.opt(tx, "Amt")
                if amt_el is not None:
                    tx_total += decimal_to_minor(amt_el.text or "", currency, _P(amt_el))
                name, acct = self.party(tx, credit=amount > 0)
                cp_name = cp_name or name
                cp_acct = cp_acct or acct
                remit = (
                    remit
                    or " ".join(clean_text(u.text, _P(u), 140) for u in self._ustrd(tx)).strip()
                )
                reason = reason or self.text(tx, "RtrInf/Rsn/Cd", 4, required=False)
        if tx_count > 1 and tx_total and tx_total != abs(amount):
            raise StatementError(
                f"{_path(n)}: transaction amounts sum to {tx_total}, the entry is {abs(amount)}"
            )
        domn = self.opt(n, "BkTxCd/Domn")
        code = ""
        if domn is not None:
            fmly = self.one(domn, "Fmly")
            code = "/".join(
                (
                    self.text(domn, "Cd", 4),
                    self.text(fmly, "Cd", 4),
                    self.text(fmly, "SubFmlyCd", 4),
                )
            )
        return Entry(
            index=index,
            amount_minor=amount,
            currency=currency,
            booking_date=booking,
            value_date=value,
            status=status,
            entry_ref=self.text(n, "NtryRef", 35, required=False),
            bank_ref=self.text(n, "AcctSvcrRef", 35, required=False),
            end_to_end_ids=tuple(e2e),
            instruction_ids=tuple(instr),
            batch_id=batch_id,
            counterparty_name=cp_name,
            counterparty_account=cp_acct,
            remittance=clean_text(remit, _P(n, " remittance"), 512),
            bank_tx_code=code,
            return_reason=reason,
            reversal=rvsl == "true",
        )

    def _ustrd(self, tx: etree._Element) -> list[etree._Element]:
        rmt = self.opt(tx, "RmtInf")
        return [] if rmt is None else self.many(rmt, "Ustrd")

    def party(self, tx: etree._Element, credit: bool) -> tuple[str, str]:
        """The other side: the debtor of a credit, the creditor of a debit."""
        parties = self.opt(tx, "RltdPties")
        if parties is None:
            return "", ""
        who = "Dbtr" if credit else "Cdtr"
        party = self.opt(parties, who)
        name = ""
        if party is not None:
            pty = self.opt(party, "Pty")  # 001.08+ wraps the party in Pty (or Agt)
            name = self.text(pty if pty is not None else party, "Nm", 140, required=False)
        acct = self.opt(parties, f"{who}Acct/Id")
        number = ""
        if acct is not None:
            number = self.text(acct, "IBAN", 34, required=False) or self.text(
                acct, "Othr/Id", 34, required=False
            )
        return name, number


class _P:
    """An element's path, worked out only if an error message needs it."""

    __slots__ = ("el", "suffix")

    def __init__(self, el: etree._Element, suffix: str = "") -> None:
        self.el = el
        self.suffix = suffix

    def __str__(self) -> str:
        return _path(self.el) + self.suffix


def _path(el: etree._Element) -> str:
    parts: list[str] = []
    node: etree._Element | None = el
    while node is not None:
        parts.append(etree.QName(node).localname)
        node = node.getparent()
    return "/".join(reversed(parts))
