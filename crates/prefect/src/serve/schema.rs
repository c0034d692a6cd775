//! A flow's parameters as the OpenAPI schema a deployment carries: the Prefect UI draws its
//! "Custom run" form from it, and the server checks runs' parameters against it.

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

/// A flow parameter that a served run can take from the server: it has a JSON schema and
/// deserializes from JSON. Derive `serde::Deserialize` and `schemars::JsonSchema` for a type
/// of your own.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a served flow's parameter",
    label = "this type must implement serde's `DeserializeOwned` and schemars' `JsonSchema`",
    note = "a served flow's parameters come from the Prefect server as JSON; derive `serde::Deserialize` and `schemars::JsonSchema` for `{Self}`"
)]
pub trait ServedParameter: DeserializeOwned + JsonSchema {}

impl<T: DeserializeOwned + JsonSchema> ServedParameter for T {}

/// Builds the schema of a flow's parameters, one at a time, in order.
#[derive(Debug)]
pub struct ParameterSchema {
    generator: SchemaGenerator,
    properties: Map<String, Value>,
    required: Vec<String>,
}

impl Default for ParameterSchema {
    fn default() -> Self {
        // Draft 7 keeps shared types under `definitions`, where the Prefect UI looks.
        Self { generator: SchemaSettings::draft07().into_generator(), properties: Map::new(), required: Vec::new() }
    }
}

impl ParameterSchema {
    /// Adds the parameter `name` of type `T`. It is required unless `null` is a value of `T`
    /// (an `Option`).
    pub fn add<T: ServedParameter>(&mut self, name: &str) {
        let schema = self.generator.subschema_for::<T>();
        let mut property = match schema.to_value() {
            Value::Object(map) => map,
            // `true`: any value.
            _ => Map::new(),
        };
        property.insert("title".into(), json!(name));
        property.insert("position".into(), json!(self.properties.len()));
        self.properties.insert(name.to_owned(), Value::Object(property));
        if serde_json::from_value::<T>(Value::Null).is_err() {
            self.required.push(name.to_owned());
        }
    }

    /// The schema, as Prefect's `ParameterSchema`.
    pub fn finish(mut self) -> Value {
        let definitions: Map<String, Value> = self.generator.take_definitions(true).into_iter().collect();
        json!({
            "title": "Parameters",
            "type": "object",
            "properties": self.properties,
            "required": self.required,
            "definitions": definitions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    #[allow(dead_code)]
    struct Point {
        x: f64,
        y: f64,
    }

    #[test]
    fn parameters_become_ordered_properties_with_their_types() {
        let mut schema = ParameterSchema::default();
        schema.add::<u32>("highest_number");
        schema.add::<Option<String>>("label");
        schema.add::<Point>("origin");
        let schema = schema.finish();
        assert_eq!(schema["properties"]["highest_number"]["type"], "integer");
        assert_eq!(schema["properties"]["highest_number"]["position"], 0);
        assert_eq!(schema["properties"]["label"]["position"], 1);
        assert_eq!(schema["required"], json!(["highest_number", "origin"]));
        assert_eq!(schema["properties"]["origin"]["$ref"], "#/definitions/Point");
        assert_eq!(schema["definitions"]["Point"]["required"], json!(["x", "y"]));
    }
}
