"""Reading a documents folder as users have one: text, Markdown, PDF, DOCX, HTML, and junk."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import pytest
from epic_rag.app.documents import read_documents


def write_pdf(path: Path, text: str) -> None:
    """A one-page PDF whose text layer holds `text` (Helvetica, one line), built by hand."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))


def write_docx(path: Path, paragraphs: list[str]) -> None:
    """A minimal Word document (the three parts a .docx needs) with `paragraphs`."""
    ns = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    body = "".join(f"<w:p><w:r><w:t>{p}</w:t></w:r></w:p>" for p in paragraphs)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            "[Content_Types].xml",
            '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.'
            'wordprocessingml.document.main+xml"/></Types>',
        )
        z.writestr(
            "_rels/.rels",
            '<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/'
            'officeDocument" Target="word/document.xml"/></Relationships>',
        )
        z.writestr(
            "word/document.xml", f'<?xml version="1.0"?><w:document xmlns:w="{ns}"><w:body>{body}</w:body></w:document>'
        )


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.md").write_text("# Notes\n\nThe depot opens at seven.\n")
    (folder / "sub" / "plain.txt").write_text("Deliveries arrive on Tuesdays.\n")
    write_pdf(folder / "spec.pdf", "The hull is made of recycled aluminium.")
    write_docx(folder / "manual.docx", ["Charge the battery for six hours.", "Store it dry."])
    (folder / "page.html").write_text(
        "<html><head><title>t</title><script>var x = 1;</script></head>"
        "<body><h1>Ports</h1><p>The buoy reports every ten minutes.</p></body></html>"
    )
    (folder / "image.bin").write_bytes(bytes(range(256)) * 4)
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    (folder / ".hidden.txt").write_text("never read")
    return folder


def test_a_mixed_folder_indexes_what_it_can_read_and_lists_the_rest(mixed_folder, caplog):
    with caplog.at_level(logging.WARNING):
        report = read_documents(mixed_folder)
    texts = {d.metadata["file_name"]: d.text for d in report.documents}
    assert sorted(texts) == ["manual.docx", "notes.md", "page.html", "spec.pdf", "sub/plain.txt"]
    assert "recycled aluminium" in texts["spec.pdf"]
    assert "Charge the battery for six hours." in texts["manual.docx"] and "Store it dry." in texts["manual.docx"]
    assert "reports every ten minutes" in texts["page.html"] and "var x" not in texts["page.html"]
    assert sorted(report.skipped) == ["broken.pdf", "image.bin"]
    assert "not text" in report.skipped["image.bin"] and "PDF unreadable" in report.skipped["broken.pdf"]
    assert "image.bin" in caplog.text and "broken.pdf" in caplog.text
    assert report.summary().startswith("read 5 document(s), skipped 2: ")


def test_strict_refuses_a_folder_with_an_unreadable_file(mixed_folder):
    with pytest.raises(ValueError, match=r"--strict: cannot read 2 file\(s\).*image\.bin"):
        read_documents(mixed_folder, strict=True)


def test_a_folder_with_nothing_readable_is_refused(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\xff" * 50)
    with pytest.raises(ValueError, match="holds no readable text.*a.bin"):
        read_documents(tmp_path)
