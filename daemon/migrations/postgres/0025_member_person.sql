-- Which person a member is (REST `/api/v1/me/*`): meshd has no user accounts. Members
-- enrolled with the same key are one person; an operator links others to a named
-- person with `meshd member link`.
CREATE TABLE member_person (
    member_id TEXT PRIMARY KEY,
    person    TEXT NOT NULL
);
CREATE INDEX member_person_person ON member_person (person);
