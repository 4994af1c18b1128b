"""``jobs.store.create_once``: a create whose answer may be lost is looked up before it is re-sent.
The end-to-end cases (a real MLflow server behind a proxy that drops answers) are in
``test_reliability.py``; these pin down which errors count as a lost answer."""
import pytest
import requests
from mlflow.exceptions import MlflowException, RestException

from jobs.store import answer_lost, create_once


def _raised_while(inner: Exception, message: str) -> MlflowException:
    """What MLflow's ``http_request`` raises: its own exception, while handling ``requests``'."""
    try:
        try:
            raise inner
        except Exception:
            raise MlflowException(message)  # noqa: B904 - as MLflow raises it: the cause kept as context
    except MlflowException as e:
        return e


def _raising(e: Exception):
    def create():
        raise e
    return create


def test_a_lost_answer_is_told_from_an_answer():
    assert answer_lost(_raised_while(requests.ConnectionError("aborted"), "any wording"))
    assert answer_lost(_raised_while(requests.ReadTimeout("slow"), "any wording"))
    assert answer_lost(MlflowException("API request to http://h/api/2.0/mlflow/runs/create failed with exception ('x')"))
    assert answer_lost(MlflowException("API request to http://h/x failed with timeout exception y."))
    assert not answer_lost(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"}))  # it answered
    assert not answer_lost(MlflowException("RESOURCE_DOES_NOT_EXIST: no such run"))
    assert not answer_lost(ValueError("API request to http://h/x failed with exception z"))  # not MLflow's


def test_create_once_finds_what_a_lost_create_made_and_resends_only_when_nothing_reached():
    lost = MlflowException("API request to http://h/x failed with exception ('Connection aborted.')")
    sent = []

    def create():
        sent.append(1)
        if len(sent) == 1:
            raise lost
        return "made on the second try"

    assert create_once(create, lambda: "made by the first") == "made by the first" and len(sent) == 1
    sent.clear()
    assert create_once(create, lambda: None) == "made on the second try" and len(sent) == 2
    exists = RestException({"error_code": "RESOURCE_ALREADY_EXISTS", "message": "Experiment(name=x) already exists"})
    assert create_once(_raising(exists), lambda: "the other driver's") == "the other driver's"
    with pytest.raises(RestException):  # it says it exists, yet nothing is found: not re-sent, raised
        create_once(_raising(exists), lambda: None)
    looked = []
    with pytest.raises(RestException):  # any other answer is raised as it is, without a look-up
        create_once(_raising(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"})),
                    lambda: looked.append(1))
    assert looked == []
