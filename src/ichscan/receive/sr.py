"""The analysis of one series as a DICOM Comprehensive SR (highdicom).

Content tree (codes: see docs/receiver.md)::

    CONTAINER  (LN 18748-4 "Diagnostic imaging report")
      TEXT       (DCM 111001 "Algorithm Name")       ichscan <architecture> (<label set>)
      TEXT       (DCM 111003 "Algorithm Version")    the ichscan version
      TEXT       (DCM 121106 "Comment")              research-use statement
      TEXT       (99ICHSCAN TRAINED_ON "Model training data")  what the model was trained
                                                     on (predict's words: SYNTHETIC phantoms)
      TEXT       (DCM 121106 "Comment")              only for a PARTIAL report: why
      CONTAINER  (DCM 121071 "Finding")              one per label, in the bundle's order
        CODE       (DCM 121071 "Finding")             the finding's code
        NUM        (DCM 111012 "Certainty of Finding") probability in percent (UCUM %)
        NUM        (99ICHSCAN THRESHOLD "Decision threshold") percent
        CODE       (99ICHSCAN DECISION "Model decision") SCT Present / SCT Absent
        IMAGE      (DCM 121080 "Best illustration of finding") the label's key slice

Percent follows the CAD SR templates' "Certainty of Finding" (0-100). A report on a series
whose association was aborted has CompletionFlag PARTIAL and says why (Completion Flag
Description and a Comment); one from a model trained on synthetic phantoms says so in its
Series Description too, where a PACS lists it. Patient and study
attributes are copied from the evidence (the series' own instances) by highdicom, and every
instance of the series is listed as evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ComprehensiveSR,
    ContainerContentItem,
    ContentSequence,
    ImageContentItem,
    NumContentItem,
    TextContentItem,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ichscan import __version__
from ichscan.models.bundle import is_synthetic_line

CONTAINS = "CONTAINS"
PRIVATE_SCHEME = "99ICHSCAN"

REPORT_TITLE = CodedConcept("18748-4", "LN", "Diagnostic imaging report")
PERCENT = CodedConcept("%", "UCUM", "Percent")
THRESHOLD = CodedConcept("THRESHOLD", PRIVATE_SCHEME, "Decision threshold")
DECISION = CodedConcept("DECISION", PRIVATE_SCHEME, "Model decision")
TRAINED_ON = CodedConcept("TRAINED_ON", PRIVATE_SCHEME, "Model training data")
SERIES_DESCRIPTION = "ichscan ICH triage"
RESEARCH_NOTE = (
    "Produced by ichscan, research software that is not a medical device: a triage aid, "
    "not a diagnosis."
)

# SNOMED CT where a standard code exists; the first comes from DICOM's own code tables
# (pydicom's codedict), the subtypes are the SNOMED CT disorders of those names. Labels
# without a standard concept (laterality, chronicity, the CQ500 fractures and mass effect)
# get codes in ichscan's private scheme 99ICHSCAN, value = the label name.
_ICH = CodedConcept("1386000", "SCT", "Intracranial hemorrhage")
_SAH = CodedConcept("21454007", "SCT", "Subarachnoid intracranial hemorrhage")
_SDH = CodedConcept("35486000", "SCT", "Subdural intracranial hemorrhage")
_IPH = CodedConcept("274100004", "SCT", "Cerebral hemorrhage")
STANDARD_CODES: dict[str, CodedConcept] = {
    "any": _ICH,
    "ich": _ICH,
    "hemorrhage": _ICH,
    "subarachnoid": _SAH,
    "sah": _SAH,
    "subdural": _SDH,
    "sdh": _SDH,
    "intraparenchymal": _IPH,
    "iph": _IPH,
}
_EDH = ("EDH", "Epidural hemorrhage")
_IVH = ("IVH", "Intraventricular hemorrhage")
# (code value, meaning); code values are SH, at most 16 characters.
PRIVATE_CODES: dict[str, tuple[str, str]] = {
    "epidural": _EDH,
    "edh": _EDH,
    "intraventricular": _IVH,
    "ivh": _IVH,
    "bleed_left": ("BLEED_LEFT", "Hemorrhage, left side"),
    "bleed_right": ("BLEED_RIGHT", "Hemorrhage, right side"),
    "chronic_bleed": ("CHRONIC_BLEED", "Chronic hemorrhage"),
    "fracture": ("FRACTURE", "Fracture"),
    "calvarial_fracture": ("CALVARIAL_FX", "Calvarial fracture"),
    "other_fracture": ("OTHER_FX", "Other fracture"),
    "mass_effect": ("MASS_EFFECT", "Mass effect"),
    "midline_shift": ("MIDLINE_SHIFT", "Midline shift"),
}


def finding_code(label: str) -> CodedConcept:
    if label in STANDARD_CODES:
        return STANDARD_CODES[label]
    value, meaning = PRIVATE_CODES.get(
        label, (label.upper()[:16], label.replace("_", " ").capitalize())
    )
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


@dataclass(frozen=True)
class LabelResult:
    label: str
    probability: float
    threshold: float
    key_sop_class: str
    key_sop_uid: str
    key_frame: int | None = None  # for a multi-frame instance

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


def _finding(result: LabelResult) -> ContainerContentItem:
    container = ContainerContentItem(name=codes.DCM.Finding, relationship_type=CONTAINS)
    container.ContentSequence = ContentSequence(
        [
            CodeContentItem(
                name=codes.DCM.Finding,
                value=finding_code(result.label),
                relationship_type=CONTAINS,
            ),
            NumContentItem(
                name=codes.DCM.CertaintyOfFinding,
                value=round(100.0 * result.probability, 3),
                unit=PERCENT,
                relationship_type=CONTAINS,
            ),
            NumContentItem(
                name=THRESHOLD,
                value=round(100.0 * result.threshold, 3),
                unit=PERCENT,
                relationship_type=CONTAINS,
            ),
            CodeContentItem(
                name=DECISION,
                value=codes.SCT.Present if result.positive else codes.SCT.Absent,
                relationship_type=CONTAINS,
            ),
            ImageContentItem(
                name=codes.DCM.BestIllustrationOfFinding,
                referenced_sop_class_uid=result.key_sop_class,
                referenced_sop_instance_uid=result.key_sop_uid,
                referenced_frame_numbers=result.key_frame,
                relationship_type=CONTAINS,
            ),
        ]
    )
    return container


def build_sr(
    evidence: Sequence[Dataset],
    results: Sequence[LabelResult],
    *,
    algorithm: str,
    series_number: int = 9901,
    trained_on: str | None = None,
    partial: str | None = None,
) -> ComprehensiveSR:
    """The SR of one analysed series. ``evidence``: the series' instances (headers suffice),
    all from one study; the SR joins that study in a new series of its own. ``trained_on``:
    what the model was trained on; ``partial``: why the series may be incomplete (the
    report is then PARTIAL)."""
    root = ContainerContentItem(name=REPORT_TITLE)
    items: list = [
        TextContentItem(codes.DCM.AlgorithmName, algorithm, relationship_type=CONTAINS),
        TextContentItem(codes.DCM.AlgorithmVersion, __version__, relationship_type=CONTAINS),
        TextContentItem(codes.DCM.Comment, RESEARCH_NOTE, relationship_type=CONTAINS),
    ]
    if trained_on:
        items.append(TextContentItem(TRAINED_ON, trained_on, relationship_type=CONTAINS))
    if partial:
        items.append(TextContentItem(codes.DCM.Comment, partial, relationship_type=CONTAINS))
    items.extend(_finding(r) for r in results)
    root.ContentSequence = ContentSequence(items)
    synthetic = is_synthetic_line(trained_on)
    notes = [n for n, on in (("PARTIAL", partial), ("SYNTHETIC-trained model", synthetic)) if on]
    sr = ComprehensiveSR(
        evidence=list(evidence),
        content=root,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="ichscan",
        is_complete=partial is None,
        is_final=False,  # unverified machine output
        series_description=SERIES_DESCRIPTION + (f" ({', '.join(notes)})" if notes else ""),
    )
    if partial:
        sr.CompletionFlagDescription = partial[:64]  # LO
    return sr


def sr_text(sr: Dataset, code_value: str) -> list[str]:
    """The values of the root's TEXT items with concept code ``code_value`` (e.g.
    ``"TRAINED_ON"``, ``"121106"`` for the comments), in order."""
    return [
        str(item.TextValue)
        for item in sr.ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == code_value
    ]


def sr_summary(sr: Dataset) -> dict[str, dict[str, object]]:
    """Per finding code ("SCT:1386000"): its meaning, probability (0-1), decision and key
    slice, read back from an SR written by :func:`build_sr` (what the tests and a curious
    operator check)."""
    out: dict[str, dict[str, object]] = {}
    for item in sr.ContentSequence:
        if item.ValueType != "CONTAINER":
            continue
        entry: dict[str, object] = {}
        name = ""
        for child in item.ContentSequence:
            concept = child.ConceptNameCodeSequence[0]
            if child.ValueType == "CODE" and concept.CodeValue == "121071":
                code = child.ConceptCodeSequence[0]
                name = f"{code.CodingSchemeDesignator}:{code.CodeValue}"
                entry["meaning"] = str(code.CodeMeaning)
            elif child.ValueType == "NUM" and concept.CodeValue == "111012":
                percent = float(child.MeasuredValueSequence[0].NumericValue)
                entry["probability"] = round(percent / 100, 6)
            elif child.ValueType == "CODE" and concept.CodeValue == "DECISION":
                entry["positive"] = child.ConceptCodeSequence[0].CodeValue == "52101004"
            elif child.ValueType == "IMAGE":
                ref = child.ReferencedSOPSequence[0]
                entry["key_sop_instance_uid"] = str(ref.ReferencedSOPInstanceUID)
                if "ReferencedFrameNumber" in ref:
                    entry["key_frame"] = int(ref.ReferencedFrameNumber)
        out[name] = entry
    return out
